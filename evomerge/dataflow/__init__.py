"""Data-flow (layer-order) merging: a path of source layers with input scales (Sakana's DFS).

    recipe.py  the layer-order recipe (path of steps; embeddings, head, tokenizer donors)
    arch.py    the allow-list of architectures whose step scales fold into weights
    model.py   the path built in memory (shared layers, own layer_idx per step, scaled inputs)
    fold.py    scales folded into output projections: a plain model / a mergekit passthrough
    space.py   the DFS search space (indicator array over M*r slots, scaling matrix, bounds)
    codec.py   genome <-> path recipe
    stages.py  staged searches (PS, then DFS over the PS winner and another model)

See docs/dataflow.md.
"""
