# A 768-wide, 12-layer DiT (0.16B parameters) that trains on one GPU in hours: for ablations
# before spending a node on dit_large. Same data as dit_large (EVA-CLIP-8B condition).
#   python train.py config/dit_base.py
exec(open('config/dit_large.py').read())
out_dir = 'out/dit_base'
dim = 768
n_layers = 12
n_heads = 12
batch_size = 128
gradient_accumulation_steps = 1
learning_rate = 3e-4
max_iters = 50000
lr_decay_iters = 50000
warmup_iters = 500
