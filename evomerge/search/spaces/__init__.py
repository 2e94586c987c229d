"""Search spaces: which merge parameters (parameter space) or which layer paths (data flow) are searched."""
