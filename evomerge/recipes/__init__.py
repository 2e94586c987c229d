"""Layer 3: what to build, as documents: the parameter-space (merge) recipe, the layer-order (data-flow) recipe, the fold of a layer path into a passthrough recipe, and mergekit YAML export."""
