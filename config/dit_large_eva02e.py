# The seed's 1.7B DiT conditioned on open_clip's EVA02-E-14-plus (1792-d, the EVA encoder BLIP3-o
# itself uses) instead of EVA-CLIP-8B: no transformers, a 5x smaller encoder, 2.3x less disk.
#   python extract.py config/dit_large_eva02e.py --coco_root=/data/coco
#   torchrun --standalone --nproc_per_node=8 train.py config/dit_large_eva02e.py
exec(open('config/dit_large.py').read())
data_dir = 'data/coco_vitl_eva02e'
out_dir = 'out/dit_large_eva02e'
eva_model = 'EVA02-E-14-plus'
eva_pretrained = 'laion2b_s9b_b144k'
cond_dim = 1792
