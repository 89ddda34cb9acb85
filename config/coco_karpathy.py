# The seed's model on Karpathy's split of COCO 2014: figures a reader can set beside published COCO
# retrieval tables (CLIP's paper, open_clip's retrieval table, CLIP_benchmark: the 5K test split).
# Train on karpathy_train (Karpathy's train + restval, 113,287 images), select on its held-out
# slice, report on karpathy_test (5,000 images), which chooses nothing. On a GPU node:
#   python extract.py config/coco_karpathy.py --coco_root=/data/coco
#   torchrun --standalone --nproc_per_node=8 train.py config/coco_karpathy.py
#   python sweep.py config/coco_karpathy.py        # optional: sampler and guidance, held-out slice
#   python sample.py config/coco_karpathy.py && python eval.py config/coco_karpathy.py
# coco_root holds images/train2014/, images/val2014/ (train2014.zip, val2014.zip) and
# annotations/dataset_coco.json (Karpathy's caption_datasets.zip). eval.py sets R beside the
# published figures of ViT-L-14 openai (published.py) and warns if any is more than 1.5 points off.
exec(open('config/dit_large.py').read())
source = 'coco_karpathy'
splits = ('karpathy_train', 'karpathy_test')  # 'karpathy_val' (5,000) is there to extract too
karpathy_json = ''  # '' = coco_root/annotations/dataset_coco.json
data_dir = 'data/karpathy_vitl_eva8b'
out_dir = 'out/dit_large_karpathy'
val_fraction = 0.02  # the held-out slice: 2,266 of karpathy_train's 113,287 images; 111,021 train
iters_per_epoch = round(113287 * (1 - val_fraction) / (batch_size * gradient_accumulation_steps))
max_iters = lr_decay_iters = epochs * iters_per_epoch
warmup_iters = max_iters // 20
eval_interval = iters_per_epoch
keep_interval = 2 * iters_per_epoch
baselines = (f'{out_dir}/samples/ridge/generated.npy',
             f'{out_dir}/samples/ckpt-regression/generated.npy')
