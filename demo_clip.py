"""The CPU demo's encoders: tiny open_clip CLIPs trained contrastively on the demo's synthetic train split.

With random encoders every method of Task 1 and Task 2 sits at chance, so the demo could not show that they work.
With `train_encoder_steps > 0`, extract.py first calls train_demo_clip for each open_clip encoder whose
`clip_pretrained` / `eva_pretrained` names a file that does not exist yet, and writes the weights there; every stage
then loads those files as it would load real weights, open_clip.create_model(name, pretrained=<file>). Later runs
reuse them.

Both stand-ins are trained, each from its own seed. The real EVA-CLIP is itself a contrastively trained CLIP whose
features relate to CLIP's by meaning; a random tower keeps each image's pixels but not that relation. On the demo,
B's image->text R@5 was 0.63x A's with a random EVA stand-in and 0.84x with a trained one (classifier-free
guidance 1.0; README).
"""
import math
import os
import time

import torch
import torch.nn.functional as F

import data
import extract


def listed_split(listing, preprocess, tokenizer):
    """The images of an extract.list_split listing, preprocessed as extraction does [count, 3, S, S]; their
    captions, tokenized [C, 77]; and the image row of every caption [C]."""
    images = torch.stack([preprocess(listing['load'](key)) for key in listing['keys']])
    captions = [listing['captions'][str(i)] for i in listing['ids']]
    owner = torch.repeat_interleave(torch.arange(len(images)), torch.tensor([len(c) for c in captions]))
    return images, tokenizer([c for cs in captions for c in cs]), owner


def encode_text(model, text, embedding):
    """model.encode_text(text, normalize=True) with two shortcuts that give the same features: token ids index
    `embedding` (the rows of model.token_embedding that the captions use, renumbered in order), and only the
    positions up to the last end-of-text token are run (attention is causal: later positions never reach it)."""
    length = int(text.argmax(1).max()) + 1  # the end-of-text token has the largest id
    text = text[:, :length]
    x = embedding[text] + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(len(x)), text.argmax(1)]  # pooled at the end-of-text token, as open_clip's 'argmax'
    return F.normalize(x @ model.text_projection, dim=-1)


def train_demo_clip(model_name, out_path, split, count, image_size, synthetic_seed, steps=600, batch_size=128,
                    lr=1e-3, weight_decay=0.1, warmup=30, token_loss=0.25, seed=0, threads=1):
    """Train open_clip `model_name`, both towers, with open_clip's ClipLoss on the synthetic images of `split`
    (each step: batch_size images from a seeded per-epoch order, one of each image's captions at random; AdamW,
    linear warm-up then cosine decay; no augmentation, extraction sees the same pixels) and write its state_dict
    to out_path. token_loss weighs the same loss on the mean of the patch tokens @ proj, Method A's image vector:
    a CLIP trained through its CLS token alone leaves A near chance on this data (R@5 11-19% at 600 steps).
    Seeded: the same settings give the same file. About 80-90 s for the demo, on one thread: on a model this
    small a second thread costs more than it brings."""
    import open_clip
    from open_clip.loss import ClipLoss
    torch.set_num_threads(threads)
    model, _, preprocess = data.open_clip_model(model_name, '')
    listing = extract.list_split(split, 'synthetic', synthetic_counts={split: count}, synthetic_seed=synthetic_seed,
                                 synthetic_image_size=image_size)  # the images and captions extraction lists
    images, text, owner = listed_split(listing, preprocess, open_clip.get_tokenizer(model_name))
    first_caption = torch.searchsorted(owner, torch.arange(count))
    captions_per_image = torch.bincount(owner, minlength=count)
    # the captions use a few dozen of the 49,408 token ids: train only those rows, then write them back
    used = torch.unique(text)
    text = torch.searchsorted(used, text)  # renumbered in order: the end-of-text token keeps the largest id
    embedding = torch.nn.Parameter(model.token_embedding.weight.detach()[used].clone())
    model.token_embedding.requires_grad_(False)
    model.visual.output_tokens = True  # model.visual(x) -> (CLS embedding, ln_post patch tokens)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and 'embedding' not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and 'embedding' not in n)] + [embedding]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(count, generator=g), 0
    start = time.time()
    for step in range(steps):
        cosine = 0.5 * (1 + math.cos(math.pi * max(step - warmup, 0) / max(steps - warmup, 1)))
        for group in optimizer.param_groups:
            group['lr'] = lr * min((step + 1) / warmup, cosine)
        if position + batch_size > count:
            order, position = torch.randperm(count, generator=g), 0
        rows = order[position:position + batch_size]
        position += batch_size
        caption = first_caption[rows] + (torch.rand(len(rows), generator=g) * captions_per_image[rows]).long()
        pooled, tokens = model.visual(images[rows])
        text_features = encode_text(model, text[caption], embedding)
        scale = model.logit_scale.exp()
        loss = loss_fn(F.normalize(pooled, dim=-1), text_features, scale)
        if token_loss:
            mean_tokens = F.normalize(tokens.mean(1) @ model.visual.proj, dim=-1)
            loss = loss + token_loss * loss_fn(mean_tokens, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the logit scale
        if step % 100 == 0 or step == steps - 1:
            print(f"{model_name} step {step}/{steps}: loss {loss.item():.3f}, {time.time() - start:.0f} s", flush=True)
    model.visual.output_tokens = False
    with torch.no_grad():
        model.token_embedding.weight[used] = embedding
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    data.write_atomic(out_path, lambda f: torch.save(model.state_dict(), f), mode='wb')
