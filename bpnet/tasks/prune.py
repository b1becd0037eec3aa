"""``bpnet prune``: remove low-norm filters from a model (bpnet/model/prune.py) and save it.

The output is an ordinary bpnet model file with the input's meta (plus a
``pruned`` entry: the options and parameter counts); retrain it with
``bpnet train`` and ``load_graph: true`` + ``pretrained_weights: <it>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import BpnetError
from ..io import output_lock, same_file
from ..model.meta import parse_meta

log = logging.getLogger("bpnet.prune")


def prune(model_path, output_path, key: str | None = None, options=None, status=None) -> dict:
    """The task body: load, prune, save; returns the figures for status.json."""
    from ..model.io import save_model
    from ..model.prune import PruneOptions, prune_model
    from ..model.weights import load_model_file

    options = options or PruneOptions()
    options.check()  # bad options fail before the model is read
    model_path, output_path = Path(model_path), Path(output_path)
    if not model_path.exists():
        raise BpnetError(f"model {model_path}: file not found")
    if same_file(model_path, output_path):
        raise BpnetError(f"the output {output_path} is the input model; choose another -o")
    if output_path.is_dir():
        raise BpnetError(f"the output {output_path} is a folder; give a file name (.keras)")
    # Two runs writing one -o at once (different results dirs): one error, not a lost file.
    with output_lock(output_path, "prune"):
        model, meta = load_model_file(model_path, key, "model")
        parse_meta(meta, str(model_path))  # a bpnet model: its outputs are heatmaps and PAFs
        if status is not None:
            status.progress(0, 1, "pruning", force=True, model=str(model_path))
        pruned, report = prune_model(model, options)
        for layer in report.layers:
            log.debug("%-32s kept %4d of %4d filters (%s)", layer.name, layer.kept, layer.total,
                      layer.reason)
        summary = {"params_before": report.params_before, "params_after": report.params_after,
                   "param_ratio": round(report.param_ratio, 6)}
        new_meta = dict(meta)
        new_meta["pruned"] = {**summary, "source": model_path.name,
                              "normalizer": options.normalizer,
                              "equalization_criterion": options.equalization_criterion,
                              "pruning_granularity": int(options.pruning_granularity),
                              "pruning_threshold": float(options.pruning_threshold),
                              "min_num_filters": int(options.min_num_filters),
                              "excluded_layers": list(options.excluded_layers)}
        save_model(pruned, output_path, new_meta, key=key)
        changed = sum(1 for l in report.layers if l.kept < l.total)
        log.info("parameters: %d before, %d after (ratio %.4f); %d of %d convolutions pruned; "
                 "wrote %s", report.params_before, report.params_after, report.param_ratio,
                 changed, len(report.layers), output_path)
        return {"output": str(output_path), **summary, "layers_pruned": changed,
                "layers": len(report.layers)}
