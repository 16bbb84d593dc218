"""What a demo checkpoint reads from a box and from a name: probes and attention (docs/demo.md).

    python bench/binding.py ckpt.pt      # any checkpoint trained on the built-in demo (~1 min on 2 cores)

REG asks which object is in a box, REC where a named object is; every demo image holds two objects
in two of its four quadrants. For Slake and SA-Med2D, on the test split, this prints:
- probes of the residual stream after each LLaMA block (block 0: its input), at the position that
  answers REG (targets: the box's quadrant, the other object's, the answer) and at the position that
  writes REC's first digit (target: which of the two objects is named);
- probes of every visual token (which object it holds; its row, half and quadrant) from the frozen
  ViT's features, the connector's output and after each block, and whether one linear score over an
  image's tokens, which is what one attention query computes, ranks a token of each object first;
- how each head at those positions splits its attention between the answer's quadrant and the
  other object's.
A probe is a logistic regression fitted on the training split's states and scored on the test split.
"""
import argparse
import collections
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from lib.checkpoint import checkpoint_data_root, read_checkpoint  # noqa: E402
from model import UniMed, apply_rope  # noqa: E402

TOKENS = 16  # the demo's visual tokens: 8 rows of 8 patches, 4 neighbours per token, so half-rows


def quadrant(box, size) -> int:
    """0 upper left, 1 upper right, 2 lower left, 3 lower right, of a pixel box's centre."""
    (x, y, w, h), (W, H) = box, size
    return int(x + w / 2 > W / 2) + 2 * int(y + h / 2 > H / 2)


def token_quadrant(t: int) -> int:
    return t % 2 + 2 * int(t // 2 >= 4)


QUADRANT_TOKENS = {q: [t for t in range(TOKENS) if token_quadrant(t) == q] for q in range(4)}


def fit(x_train, y_train, steps=300, weight_decay=1e-3):
    """A logistic regression on standardised features -> (its classes, the logits it gives new x)."""
    classes = sorted(set(y_train))
    y = torch.tensor([classes.index(c) for c in y_train])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], len(classes))
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear((x_train - mean) / std), y).backward()
        opt.step()
    return classes, lambda x: linear((x - mean) / std).detach()


def probe(x_train, y_train, x_test, y_test) -> float:
    """Test accuracy (%) of a logistic regression fitted on the training states."""
    classes, logits = fit(x_train, y_train)
    y_test = torch.tensor([classes.index(c) if c in classes else -1 for c in y_test])
    return 100.0 * (logits(x_test).argmax(1) == y_test).float().mean().item()


class Recorder:
    """Forward hooks on the LLaMA: each block's output and each head's attention probabilities."""

    def __init__(self, model: UniMed):
        self.states, self.attention = [], []
        for block in model.llama.layers:
            block.register_forward_hook(lambda module, args, out: self.states.append(out))
            block.attn.register_forward_pre_hook(self.attend)

    def attend(self, attn, args):
        x, cos, sin = args[:3]
        B, T, _ = x.shape
        q = apply_rope(attn.q_proj(x).view(B, T, attn.n_heads, -1).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(B, T, attn.n_kv_heads, -1).transpose(1, 2), cos, sin)
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        self.attention.append(scores.masked_fill(causal, float("-inf")).softmax(-1))  # [B, H, T, T]


def collect(model: UniMed, recorder: Recorder, dataset) -> dict:
    """Per sample: states at the decisive position, visual tokens at every depth, attention there."""
    samples = [dataset.get(i, i % len(dataset.templates)) for i in range(len(dataset))]
    by_image = collections.defaultdict(list)
    for s in samples:
        by_image[s.id.rsplit("/", 1)[0]].append(s)
    first = 1 + len(model.tokenizer.encode("[INST] <Img>", bos=False))  # where the image starts
    out = collections.defaultdict(list)
    for k in range(0, len(samples), 25):
        chunk = samples[k:k + 25]
        batch = data.collate(chunk, image_size=model.image_size)
        recorder.states.clear()
        recorder.attention.clear()
        with torch.no_grad():
            features = model.vision_features(batch.images).reshape(len(chunk), TOKENS, -1)
            embeds, labels, _, _ = model.training_inputs(batch.images, batch.instructions, batch.answers, batch.task)
            model.llama(inputs_embeds=embeds)
        states = [embeds] + recorder.states
        for j, s in enumerate(chunk):
            answer = (labels[j] != -100).nonzero()[:, 0].tolist()
            if batch.task == "refer":  # the first digit decides the box's side
                answer = [p for p in answer if model.tokenizer.decode([int(labels[j, p])]).strip().isdigit()]
            at = answer[0] - 1  # the position that predicts it
            other = next(o for o in by_image[s.id.rsplit("/", 1)[0]] if o is not s)
            out["at"].append(torch.stack([h[j, at] for h in states]).float())                 # [L + 1, D]
            out["tokens"].append(torch.stack([h[j, first:first + TOKENS] for h in states]).float())
            out["vit"].append(features[j].float())                                            # [16, width]
            out["attention"].append(torch.stack([a[j, :, at, first:first + TOKENS] for a in recorder.attention]))
            out["quadrant"].append(quadrant(s.box, s.image_size))
            out["other_quadrant"].append(quadrant(other.box, other.image_size))
            out["object"].append(s.answer if batch.task == "identify" else s.id.rsplit("/", 1)[1])
            out["other_object"].append(other.answer if batch.task == "identify" else other.id.rsplit("/", 1)[1])
            out["named"].append(s.id.endswith("/0"))
    return out


def report(name: str, train: dict, test: dict, blocks: int, heads: int) -> None:
    depth = range(blocks + 1)
    at = lambda split, L: torch.stack([x[L] for x in split["at"]])  # noqa: E731
    print(f"\n== {name} ({len(test['quadrant'])} test samples)")
    targets = ["quadrant", "other_quadrant", "object"] if "reg" in name else ["named"]
    for target in targets:
        cells = [f"{probe(at(train, L), train[target], at(test, L), test[target]):5.1f}" for L in depth]
        print(f"  probe at the decisive position, {target:14s} after blocks 0..{blocks}: " + " ".join(cells))

    def token_rows(split, source):
        """One row per visual token: its features and what it holds."""
        xs, held, where = [], [], []
        for i in range(len(split["quadrant"])):
            for t in range(TOKENS):
                q = token_quadrant(t)
                xs.append(split["vit"][i][t] if source == "vit" else split["tokens"][i][source, t])
                held.append(split["object"][i] if q == split["quadrant"][i] else
                            split["other_object"][i] if q == split["other_quadrant"][i] else "none")
                where.append((t // 2, t % 2, q))
        return torch.stack(xs), held, where
    if "reg" in name:  # the objects' names are the answers: probe the visual tokens for them
        for source in ["vit"] + list(depth):
            x_train, held_train, where_train = token_rows(train, source)
            x_test, held_test, where_test = token_rows(test, source)
            cells = [f"object {probe(x_train, held_train, x_test, held_test):5.1f}"]
            for k, what in enumerate(("row", "half", "quadrant")):
                cells.append(f"{what} {probe(x_train, [w[k] for w in where_train], x_test, [w[k] for w in where_test]):5.1f}")
            label = "frozen ViT" if source == "vit" else f"after block {source}" if source else "connector out"
            print(f"  visual tokens, {label:13s}: " + "  ".join(cells))
        x_train, held_train, _ = token_rows(train, "vit")
        x_test, held_test, _ = token_rows(test, "vit")
        for target in sorted(set(held_train) - {"none"}):  # one query vector: one-vs-rest, the top token
            _, logits = fit(x_train, [h == target for h in held_train], steps=500, weight_decay=1e-4)
            scores = (logits(x_test) @ torch.tensor([-1.0, 1.0])).view(-1, TOKENS)  # True's logit - False's
            is_target = torch.tensor([h == target for h in held_test]).view(-1, TOKENS)
            top = is_target.gather(1, scores.argmax(1, keepdim=True)).float().mean().item()
            print(f"  one linear score over the frozen ViT's tokens ranks a {target} token first in {100 * top:.0f}% of test images")
    def share(weights, quadrants) -> float:
        """Mean attention weight on the tokens of each sample's given quadrant."""
        return sum(w[QUADRANT_TOKENS[q]].sum().item() for w, q in zip(weights, quadrants)) / len(weights)
    for L in range(blocks):
        cells = []
        for h in range(heads):
            weights = [a[L, h] for a in test["attention"]]
            mine, theirs = share(weights, test["quadrant"]), share(weights, test["other_quadrant"])
            image = sum(w.sum().item() for w in weights) / len(weights)
            cells.append(f"h{h} {image:.2f} = {mine:.2f} + {theirs:.2f} + ...")
        print(f"  attention from the decisive position, block {L + 1} (image = answer's quadrant + other object's + rest): "
              + "  ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-root", help="default: the one the checkpoint records")
    args = p.parse_args()
    model = UniMed.from_checkpoint(args.checkpoint)
    root = checkpoint_data_root(read_checkpoint(args.checkpoint), args.checkpoint, args.data_root)
    recorder = Recorder(model)
    config = model.llama.config
    for name in ("slake_reg", "sa_med2d_reg", "slake_rec", "sa_med2d_rec"):
        train, test = (collect(model, recorder, data.load_datasets(root, split, names=[name], train=False)[name])
                       for split in ("train", "test"))
        report(name, train, test, config.n_layers, config.n_heads)


if __name__ == "__main__":
    main()
