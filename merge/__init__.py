"""FlexMerge: data-free, size-flexible merging of fine-tuned checkpoints."""
