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
# dit_large's schedule for this batch: `epochs` of the train2017 rows left after val_fraction
iters_per_epoch = round(118287 * (1 - val_fraction)
                        / (batch_size * gradient_accumulation_steps))  # 906
max_iters = lr_decay_iters = epochs * iters_per_epoch  # 9,060
warmup_iters = max_iters // 20
eval_interval = iters_per_epoch
keep_interval = 2 * iters_per_epoch
