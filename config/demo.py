# The CPU demo: synthetic images, tiny trained stand-in encoders, a tiny DiT and its baselines;
# minutes on 2 cores.
# python extract.py config/demo.py && python train.py config/demo.py
# python sample.py config/demo.py && python ridge.py config/demo.py
# python train.py config/demo.py --objective=regression --always_save_checkpoint=False \
#     --out_dir=out/demo-regression   (its best held-out checkpoint: regression can overfit)
# python sample.py config/demo.py --ckpt_path=out/demo-regression/ckpt.pt
# python eval.py config/demo.py

# --- data (every stage): data/demo/train and data/demo/val ---
data_dir = 'data/demo'
splits = ('train', 'val')
# the held-out slice, train's last 400 images: train.py validates there, ridge.py picks its lambda
# and sweep.py the sampler and guidance there; data/demo/val, the reported split, chooses nothing
val_fraction = 0.2

# --- model (model.py DiTConfig fields) ---
dim = 128
n_layers = 4
n_heads = 4
in_dim = 64
cond_dim = 96
grid_size = 4

# --- extract.py ---
source = 'synthetic'  # coloured shapes with captions, drawn from a seed: no download
synthetic_counts = {'train': 2000, 'val': 250}
synthetic_image_size = 64
clip_model = 'tiny-clip'  # config/encoders/tiny-clip.json: 64 wide (in_dim), 32-d embedding
eva_model = 'tiny-eva'  # config/encoders/tiny-eva.json: 96 wide (cond_dim)
# the first extract.py run trains both stand-ins contrastively on the train split (demo.py) into
# these files; every stage then loads them as it would load real weights
clip_pretrained = 'data/demo/tiny-clip.pt'
eva_pretrained = 'data/demo/tiny-eva.pt'
train_encoder_steps = 600
num_workers = 1

# --- train.py ---
out_dir = 'out/demo'
init_from = 'auto'  # running the demo again continues (or just reports) the run in out/demo
dtype = 'float32'  # the demo runs on a CPU: plain float32, no autocast
compile = False  # compiling a model this small costs more than it saves on a CPU
batch_size = 64
gradient_accumulation_steps = 1
max_iters = 800  # 32 epochs of the 1600 training images
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 800
ema_decay = 0.999
eval_interval = 200
keep_interval = 200  # out/demo/ckpt_iter000200.pt ... 000800.pt (7 MB each), for sweep.py
eval_iters = 7  # 7 x 64 >= 400 items: the whole held-out slice
eval_gen_items = 64
log_interval = 50

# --- sample.py / eval.py ---
# generate for data/demo/val from out_dir/ckpt.pt, then evaluate A, B and R there
# chosen by sweep.py on the held-out slice (README): the best held-out image->text R@5 (55.0%) of
# midpoint 5 / 10 steps x guidance 1, 1.5, 2, 2.5, 3, 4; guidance 1.5 to 3 all came within 2.5
# points of it, the noise of 400 images
sample_method = 'midpoint'  # 2 model calls a step, error O(1/steps^2), never the model at t = 1
sample_steps = 10
cfg_scale = 2.0
sample_batch_size = 125  # 250 val images: two batches
eval_batch_size = 250
# the baselines beside B in eval.py's table (each skipped with a note until its stage wrote it)
baselines = ('out/demo/samples/ridge/generated.npy',
             'out/demo/samples/ckpt-regression/generated.npy')
