# The seed's model: Lumina-Next style DiT, 1792 wide, 24 layers, 28 heads (1.73B parameters),
# conditioned on EVA-CLIP-8B (4096-d). Use on GPU nodes, for every stage:
#   python extract.py config/dit_large.py --coco_root=/data/coco
#   torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py
#   python sample.py config/dit_large.py && python eval.py config/dit_large.py

# data: COCO 2017 train for training, val for validation, sampling and evaluation
source = 'coco'
splits = ('train2017', 'val2017')
data_dir = 'data/coco_vitl_eva8b'  # -> data_dir/train2017, data_dir/val2017 for every stage
out_dir = 'out/dit_large'
# plain ViT-L-14 + openai silently builds GELU instead of QuickGELU
clip_model = 'ViT-L-14-quickgelu'
clip_pretrained = 'openai'
eva_model = 'hf:BAAI/EVA-CLIP-8B'

# model
dim = 1792
n_layers = 24
n_heads = 28
in_dim = 1024
cond_dim = 4096
grid_size = 16

# training: global batch 32 x 8 = 256 samples a step, for `epochs` passes over the training rows
# (the seed trains 10 epochs at lr 1e-4). The schedule derives from epochs and the batch: change
# those here, not max_iters (a --batch_size on the command line does not re-derive it). Validation
# holds out the last val_fraction of train2017, so val2017 stays the test set and no checkpoint is
# selected on it.
batch_size = 32
gradient_accumulation_steps = 8
learning_rate = 1e-4
min_lr = 1e-5
epochs = 10
val_fraction = 0.02  # 2,366 of train2017's 118,287 images; 115,921 train
iters_per_epoch = round(118287 * (1 - val_fraction)
                        / (batch_size * gradient_accumulation_steps))  # 453
max_iters = lr_decay_iters = epochs * iters_per_epoch  # 4,530
warmup_iters = max_iters // 20  # 5%
eval_interval = iters_per_epoch  # validation loss, generation check and ckpt.pt once an epoch
keep_interval = 2 * iters_per_epoch  # EMA-only ckpt_iterN.pt every 2 epochs, for sweep.py
dtype = 'bfloat16'
compile = True

# evaluation (eval.py): the baselines beside B, each written by its own stage first:
#   python ridge.py config/dit_large.py                    -> out/dit_large/samples/ridge/
#   torchrun ... train.py config/dit_large.py --objective=regression \
#       --out_dir=out/dit_large_regression
#   python sample.py config/dit_large.py --ckpt_path=out/dit_large_regression/ckpt.pt
#                                                          -> out/dit_large/samples/ckpt-regression/
# the sampler and guidance are chosen on the held-out slice (sweep.py, holdout=True by default),
# never on val2017
baselines = ('out/dit_large/samples/ridge/generated.npy',
             'out/dit_large/samples/ckpt-regression/generated.npy')
ridge_rows = 20000  # 20,000 of 115,921 training images (5.1M tokens) fit 4097 x 4097 statistics
