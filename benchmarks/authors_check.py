"""Step-level cross-check against the paper authors' own code:
`python -m benchmarks.authors_check --checkout TF4CTR --python THEIR_PYTHON --data Frappe_x1_csv`.

Both sides start from the same weights (this project's initialisation for `--seed`, copied into
their TF4CTRv2), train the same Frappe batches (their encoded train.h5, rows in a fixed random
order) with frappe_x1's model, TF loss, embedding penalty 0.1 (full tables), clipping at 10 and
Adam 1e-3, lr x0.1 before step `--decay-at`, then score 4,096 validation rows in eval mode
(BatchNorm running statistics). Dropout is `--dropout` (frappe_x1's 0.2 by default): on the eager
path both sides' dropout layers draw the same masks (`authors_side.use_seeded_dropout`, keyed
by layer name and step), so where dropout sits and how it scales is checked as well.

float64 (the default) checks the maths: this project's eager ops against theirs, where any
difference in the model, the loss, the penalty, the clip, Adam, the lr decay or BatchNorm's
running statistics shows, and rounding does not. The step losses and the validation
probabilities must agree to 1e-9 or the command exits 1. float32 with `--path default` runs
what training runs (fused dense layers, the compiled CPU kernels, torch's fused Adam) and
prints the distance next to the one between their own float32 and float64 runs, the rounding
envelope any float32 implementation lives in.

Their half runs in their Python environment (`benchmarks/authors_side.py`, which imports their
checkout and calls its public API); their code is not part of this project. The Linear biases
in front of each BatchNorm are listed apart: their exact gradient is zero (BatchNorm removes
them), so both sides move them by Adam steps on rounding noise, which changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.authors_side import use_seeded_dropout

SIDE = Path(__file__).with_name("authors_side.py")
PREFIXES = {  # this project's parameter names -> theirs
    "simple_encoder.net.": "easy_encoder.mlp.",
    "complex_encoder.net.": "hard_encoder.mlp.",
    "simple_head.": "DFM.fc1.",
    "complex_head.": "DFM.fc2.",
    "embedding.embedding_bags.easy_": "SSM.easy_sample_embedding.embedding_layer.embedding_layers.",
    "hard_embedding.embedding_bags.hard_": "SSM.hard_sample_embedding.embedding_layer.embedding_layers.",
}
TOLERANCE = 1e-9


def their_name(ours: str) -> str:
    for prefix, theirs in PREFIXES.items():
        if ours.startswith(prefix):
            return theirs + ours[len(prefix):]
    raise KeyError(ours)


def to_theirs(state: dict) -> dict:
    """Our state dict -> theirs (numpy); WSF's two scalars become their (2, 1) weight."""
    out = {their_name(k): v.detach().double().numpy() for k, v in state.items() if not k.startswith("fusion.")}
    out["DFM.w"] = torch.stack([state["fusion.w_s"], state["fusion.w_c"]]).reshape(2, 1).double().numpy()
    return out


def build_model(fields: list[tuple[str, int]], seed: int, path: str, dropout: float = 0.0):
    from tf4ctr_dist.cli.train import resolve_preset
    from tf4ctr_dist.config import load_config
    from tf4ctr_dist.kernels import load
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    cfg = load_config(resolve_preset("frappe_x1"), [f"net_dropout={dropout}"])
    torch.manual_seed(seed)
    kernels = load(cfg.train.cpu_kernels) if path == "default" else None
    model = tf4ctr(fields, cfg.model, cpu_kernels=kernels, fused_dense=path == "default")
    return cfg, TF4CTRTrain(model, Objective(cfg.loss))


def exact_lookup(ebc, fields: list[str]):
    """A float64 forward for an EBC of one-id-per-row fields: torchrec's CPU pooling works in
    float32 whatever the weights, which would put float32 rounding into the float64 check."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    tables = ebc.embedding_bags

    def forward(features):
        ids = features.to_dict()
        rows = [tables[t].weight[ids[f].values()] for t, f in zip(tables.keys(), fields)]  # F x (B, d)
        return KeyedTensor(keys=fields, length_per_key=[r.shape[1] for r in rows], values=torch.cat(rows, 1))

    return forward


def train_ours(workdir: Path, fields: list[tuple[str, int]], args) -> dict:
    """Our half: the same steps through DenseStepHooks (penalty, clip, step), the wrapper
    build_optimizer puts around Adam in every training worker."""
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from tf4ctr_dist.distributed.sharding import DenseStepHooks

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    cfg, module = build_model(fields, args.seed, args.path, args.dropout)
    init = np.load(workdir / "init.npz")
    state = module.model.state_dict()
    for key in state:
        if key == "fusion.w_s":
            state[key] = torch.tensor(float(init["DFM.w"][0, 0]))
        elif key == "fusion.w_c":
            state[key] = torch.tensor(float(init["DFM.w"][1, 0]))
        elif "running" not in key and "num_batches" not in key:
            state[key] = torch.from_numpy(init[their_name(key)])
    module.model.load_state_dict(state)
    module.to(dtype)
    names = [f for f, _ in fields]
    if dtype == torch.float64:
        module.model.embedding.forward = exact_lookup(module.model.embedding, names)
        module.model.hard_embedding.forward = exact_lookup(module.model.hard_embedding, names)
    named = dict(module.named_parameters())
    emb_ids = {id(p) for k, p in named.items() if "embedding_bags" in k}

    def adam(params: list) -> torch.optim.Optimizer:
        groups = [{"params": [p for p in params if id(p) not in emb_ids]},
                  {"params": [p for p in params if id(p) in emb_ids]}]
        return torch.optim.Adam(groups, lr=cfg.train.lr, fused=(dtype == torch.float32) or None)

    keyed = KeyedOptimizerWrapper(named, adam)
    optimizer = DenseStepHooks(keyed, [p for p in named.values() if id(p) not in emb_ids],
                               [p for p in named.values() if id(p) in emb_ids], clip=cfg.train.clip_grad_norm,
                               clip_embeddings=cfg.train.clip_embeddings, full_decay=cfg.train.emb_reg,
                               touched_decay=0.0)
    data = np.load(workdir / "batches.npz")

    def features(ids: np.ndarray) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_lengths_sync(
            keys=names, values=torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1)),
            lengths=torch.ones(ids.size, dtype=torch.int32))

    class Rows:  # what TF4CTRTrain reads from a Batch
        def __init__(self, ids: np.ndarray, labels: np.ndarray) -> None:
            self.sparse_features = features(ids)
            self.labels = torch.from_numpy(labels).to(dtype)
            self.valid = torch.ones(len(labels), dtype=dtype)

    if args.path == "eager" and use_seeded_dropout(module.model, their_name) != 5 * (args.dropout > 0):
        raise SystemExit("expected a dropout layer after each of the 2 + 3 hidden layers")
    losses = []
    module.train()
    for step in range(args.steps):
        if step == args.decay_at:
            for group in keyed._optimizer.param_groups:
                group["lr"] = max(group["lr"] * cfg.train.lr_decay, cfg.train.min_lr)
        lo = (step * args.batch) % (len(data["labels"]) - args.batch)
        optimizer.zero_grad()
        loss, _ = module(Rows(data["ids"][lo:lo + args.batch], data["labels"][lo:lo + args.batch]))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    with torch.no_grad():
        logits, _, _ = module.model(features(data["valid_ids"]))
    out = {"loss": np.array(losses), "valid_probs": torch.sigmoid(logits).reshape(-1).double().numpy()}
    out.update({f"p:{k}": v for k, v in to_theirs(module.model.state_dict()).items()})
    return out


def compare(theirs: dict, ours: dict) -> dict:
    """Relative step-loss distance, mean |probability| distance, worst relative parameter
    distance; the pre-BatchNorm biases and the running means they feed are reported apart."""
    loss_rel = np.abs(theirs["loss"] - ours["loss"]) / np.abs(theirs["loss"])
    apart = set()
    for key in theirs:  # 'p:easy_encoder.mlp.3.bias' is followed by BatchNorm 'mlp.4'
        if key.endswith(".bias") and "_encoder.mlp." in key:
            head, index, _ = key.rsplit(".", 2)
            if f"{head}.{int(index) + 1}.running_mean" in theirs:
                apart |= {key, f"{head}.{int(index) + 1}.running_mean"}
    params, biases = {}, {}
    for key, value in theirs.items():
        if key.startswith("p:") and not key.endswith("num_batches_tracked"):
            dist = float(np.abs(value - ours[key]).max() / max(np.abs(value).max(), 1e-30))
            (biases if key in apart else params)[key[2:]] = dist
    worst = max(params, key=params.get)
    return {"loss_rel_first": float(loss_rel[0]), "loss_rel_mean": float(loss_rel.mean()),
            "loss_rel_max": float(loss_rel.max()),
            "valid_probs_mean_abs": float(np.abs(theirs["valid_probs"] - ours["valid_probs"]).mean()),
            "param_rel_max": params[worst], "param_worst": worst, "pre_bn_rel_max": max(biases.values())}


def run_theirs(args, workdir: Path, dtype: str) -> dict:
    subprocess.run([args.python, str(SIDE), "train", args.checkout, args.data, str(workdir), dtype, str(args.steps),
                    str(args.decay_at), str(args.batch), str(args.dropout)], check=True)
    return dict(np.load(workdir / "authors.npz"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", required=True, help="a checkout of the authors' repository (TF4CTR)")
    p.add_argument("--python", required=True, help="a Python with their requirements (torch, h5py, ...)")
    p.add_argument("--data", required=True, help="their encoded Frappe_x1_csv folder (feature_map.json, *.h5)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--path", choices=["eager", "default"], default="eager",
                   help="eager: plain torch modules; default: what training runs (float32 only)")
    p.add_argument("--dropout", type=float,
                   help="net_dropout on both sides (default: frappe_x1's 0.2 on the eager path, 0 with --path "
                        "default, which draws its masks from its own stream)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--decay-at", type=int, default=40)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.path == "default" and args.dtype != "float32":
        p.error("--path default runs the float32 kernels; use --dtype float32")
    if args.dropout is None:
        args.dropout = 0.2 if args.path == "eager" else 0.0
    if args.path == "default" and args.dropout:
        p.error("--path default draws its own dropout masks: use --dropout 0")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tf4ctr-authors-check-") as tmp:
        workdir = Path(tmp)
        subprocess.run([args.python, str(SIDE), "batches", args.checkout, args.data, tmp], check=True)
        vocab = {k: v["vocab_size"] for spec in json.loads(Path(args.data, "feature_map.json").read_text())["features"]
                 for k, v in spec.items() if v.get("type") == "categorical"}
        fields = [(str(f), vocab[str(f)]) for f in np.load(workdir / "batches.npz")["fields"]]
        _, module = build_model(fields, args.seed, "eager", args.dropout)  # dropout shifts the layer indices
        np.savez(workdir / "init.npz", **{k: v for k, v in to_theirs(module.model.state_dict()).items()
                                          if "running" not in k and "num_batches" not in k})
        theirs = run_theirs(args, workdir, args.dtype)
        result = {"settings": vars(args), "ours_vs_theirs": compare(theirs, train_ours(workdir, fields, args))}
        if args.dtype == "float32":  # the envelope: their own float32 run against their float64 run
            result["their_float32_vs_float64"] = compare(run_theirs(args, workdir, "float64"), theirs)
    for name, figures in result.items():
        if name != "settings":
            print(f"{name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in figures.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    check = result["ours_vs_theirs"]
    if args.dtype == "float64" and max(check["loss_rel_max"], check["valid_probs_mean_abs"]) > TOLERANCE:
        print(f"FAIL: float64 distance above {TOLERANCE:g}: the two sides do not compute the same maths")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
