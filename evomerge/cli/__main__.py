import sys

from evomerge.cli.main import main

sys.exit(main())
