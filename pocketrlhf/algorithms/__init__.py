"""Pure loss and advantage math: small functions of tensors, each tested on hand-made values."""
