# The seed's model: Lumina-Next style DiT, 1792 wide, 24 layers, 28 heads, EVA-CLIP-8B condition.
# Use on a GPU node: torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py
dim = 1792
n_layers = 24
n_heads = 28
in_dim = 1024
cond_dim = 4096
grid_size = 16
