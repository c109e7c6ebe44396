"""The authors' half of `benchmarks.authors_check`; runs in the authors' Python environment.

It imports their code from a checkout (never copied here) and uses only its public API:
FeatureMap, TF4CTRv2, train_step (loss + penalty -> backward -> clip 10 -> Adam), lr_decay and
add_regularization. Two commands, both reading and writing .npz files in WORKDIR:

  python authors_side.py batches CHECKOUT DATA_DIR WORKDIR
      WORKDIR/batches.npz: the train split's rows in a fixed random order, 4,096 validation rows
  python authors_side.py train CHECKOUT DATA_DIR WORKDIR DTYPE STEPS DECAY_AT BATCH DROPOUT
      loads WORKDIR/init.npz into TF4CTRv2 (frappe_x1's settings, dropout DROPOUT with the masks
      of `use_seeded_dropout`), trains STEPS steps (lr x0.1 before step DECAY_AT), writes
      WORKDIR/authors.npz: per-step data loss, every parameter and buffer, the eval-mode
      probabilities of the validation rows.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np


def load_model_class(path: str, name: str) -> type:
    """Their model file on its own: their `src/__init__.py` at a52d10a imports a module the
    repository does not contain (`TF4CTR_emb_grad`), so `import src` fails on a clean checkout."""
    spec = importlib.util.spec_from_file_location(f"authors_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def use_seeded_dropout(model, rename=lambda name: name) -> int:
    """Give every nn.Dropout in `model` masks that depend only on its name (after `rename`, so
    both sides use the authors' names) and how often it has run: the k-th call of module N keeps
    x where a float64 uniform from a generator seeded by crc32("N:k") is >= p, then scales by
    1 / (1 - p). Both sides draw the same masks for the same layer at the same step, so dropout's
    placement and scaling are checked too; a dropout the other side lacks shows as a difference.
    Returns the number of dropout modules."""
    import zlib

    import torch

    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Dropout):
            continue
        key, calls = rename(name), [0]

        def forward(x, module=module, key=key, calls=calls):
            if not module.training or module.p == 0:
                return x
            generator = torch.Generator().manual_seed(zlib.crc32(f"{key}:{calls[0]}".encode()))
            calls[0] += 1
            keep = torch.rand(x.shape, generator=generator, dtype=torch.float64) >= module.p
            return x * keep.to(x.dtype) * (1.0 / (1.0 - module.p))

        module.forward = forward
        count += 1
    return count


def main(argv: list[str]) -> None:
    command, checkout, data_dir, workdir = argv[:4]
    sys.path.insert(0, checkout)  # their fuxictr
    import h5py
    import torch
    from fuxictr.features import FeatureMap

    TF4CTRv2 = load_model_class(f"{checkout}/TF4CTR/TF4CTR_torch/src/TF4CTRv2.py", "TF4CTRv2")

    feature_map = FeatureMap("Frappe_x1_csv", data_dir)
    feature_map.load(f"{data_dir}/feature_map.json", {"embedding_dim": 16})
    fields = [f for f, spec in feature_map.features.items() if spec["type"] != "meta"]
    if command == "batches":
        train, valid = h5py.File(f"{data_dir}/train.h5", "r"), h5py.File(f"{data_dir}/valid.h5", "r")
        order = np.random.default_rng(7).permutation(len(train["label"]))
        np.savez(f"{workdir}/batches.npz", fields=np.array(fields),
                 ids=np.stack([train[f][:][order] for f in fields], 1),  # (N, F)
                 labels=train["label"][:][order].astype(np.float32),
                 valid_ids=np.stack([valid[f][:][:4096] for f in fields], 1),
                 valid_labels=valid["label"][:][:4096].astype(np.float32))
        return
    dtype = {"float64": torch.float64, "float32": torch.float32}[argv[4]]
    steps, decay_at, batch, dropout = int(argv[5]), int(argv[6]), int(argv[7]), float(argv[8])
    torch.set_num_threads(1)
    model = TF4CTRv2(feature_map, gpu=-1, learning_rate=1e-3, embedding_regularizer=0.1, net_regularizer=0,
                     embedding_dim=16, hard_hidden_units=[400, 400, 400], easy_hidden_units=[400, 400], gamma=1,
                     c=0.7, alpha=0.25, SSM="SER", DFM="WSF", hidden_activations="relu", net_dropout=dropout,
                     batch_norm=True, optimizer="adam", loss="binary_crossentropy", verbose=0,
                     model_root=f"{workdir}/checkpoints", monitor={"AUC": 1, "gAUC": 1}, monitor_mode="max",
                     early_stop_patience=2, save_best_only=True, eval_steps=None, reduce_lr_on_plateau=True,
                     feature_specs=None, metrics=["AUC"])
    init = np.load(f"{workdir}/init.npz")
    state = model.state_dict()
    for key in state:
        if key in init.files:
            state[key] = torch.from_numpy(init[key])
        elif "running" not in key and "num_batches" not in key:
            raise SystemExit(f"init.npz has no {key}")
    model.load_state_dict(state)
    model.to(dtype)
    model.compile("adam", "binary_crossentropy", 1e-3)  # a fresh Adam over the converted parameters
    model._max_gradient_norm = 10.0  # fit()'s default
    label_col = feature_map.get_column_index("label")
    model.get_labels = lambda inputs: inputs[:, label_col].to(dtype).view(-1, 1)  # theirs casts to float32
    data = np.load(f"{workdir}/batches.npz")
    columns = max(feature_map.get_column_index(f) for f in fields + ["label"]) + 1

    def inputs(ids: np.ndarray, labels: np.ndarray) -> "torch.Tensor":
        x = torch.zeros(len(ids), columns, dtype=torch.float64)  # their loaders' one-tensor batch
        for j, f in enumerate(fields):
            x[:, feature_map.get_column_index(f)] = torch.from_numpy(ids[:, j]).double()
        x[:, label_col] = torch.from_numpy(labels).double()
        return x

    losses = []
    use_seeded_dropout(model)
    model.train()
    for step in range(steps):
        if step == decay_at:
            model.lr_decay()
        lo = (step * batch) % (len(data["labels"]) - batch)
        with torch.no_grad():
            penalty = float(model.add_regularization())
        loss = model.train_step(inputs(data["ids"][lo:lo + batch], data["labels"][lo:lo + batch]))
        losses.append(loss.item() - penalty)  # the data loss, as the project logs it
    model.eval()
    with torch.no_grad():
        probs = model(inputs(data["valid_ids"], data["valid_labels"]))["y_pred"].reshape(-1)
    out = {"loss": np.array(losses), "valid_probs": probs.double().numpy()}
    out.update({f"p:{k}": v.double().numpy() for k, v in model.state_dict().items()})
    np.savez(f"{workdir}/authors.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1:])
