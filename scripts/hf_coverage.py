"""Coverage of moespec over every MoE family of the installed transformers.

Each family whose modeling code declares experts with ``use_experts_implementation`` is built
tiny from its config class (``moespec.models.hf_tiny``; its language model when multimodal)
and checked, each in its own forked process:

- attach: ``moespec.models.hf.attach`` finds its MoE blocks;
- logits: attached logits equal the unattached model's (1e-5, float32, train and eval);
- losses: the probe's losses equal ``moespec.routing.losses`` on the router's own scores and
  on raw expert outputs from a per-token loop over the model's eager experts;
- train: 3 AdamW steps with ``loss=specialization`` (LM loss + routing losses), finite;
- export: ``save_pretrained`` loads back in plain transformers (the model's own class) with
  equal logits;
- ep: the experts converted to DeepSpeed expert parallel over 2 CPU ranks (gloo) give the
  one-process model's logits and loss, and train 2 steps through a DeepSpeed engine
  (``scripts/hf_coverage_ep.py``: one 2-rank launch whose ranks loop over the families);
- autoep (not counted in "every column"): for the families DeepSpeed AutoEP has a preset for,
  ``deepspeed.initialize`` converts the model on 2 ranks and its logits, routing losses,
  gradients and weights equal the unconverted model's (``tests/workers/autoep_check.py``);
  ``-``: no preset (``moe.backend=deepspeed`` runs it).

A language model without an LM head class (the text model of some multimodal families) is
scored through its tied input embedding.

    python scripts/hf_coverage.py [--only gpt_oss,jamba] [--write docs/hf_models.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moespec.models.hf_tiny import moe_families, tiny_moe_model  # noqa: E402

COLUMNS = ("attach", "logits", "losses", "train", "export", "ep")
#: Shown beside COLUMNS, not part of "every column": DeepSpeed AutoEP runs only some families.
AUTOEP = "autoep"
EP_RANKS = 2
WALL_PER_CPU = 8  # a family's wall-clock limit, in multiples of its CPU limit (a loaded host)
TABLE_START = "<!-- coverage table: scripts/hf_coverage.py -->"
TABLE_END = "<!-- end coverage table -->"
VOCAB = 64


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B,S,V]; a text model without an LM head class gets its tied embedding as head."""
    torch.manual_seed(0)  # routers with jitter or sampling draw the same noise
    out = model(input_ids=ids, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out.last_hidden_state @ model.get_input_embeddings().weight.T
    return logits


def _loss_config(**weights: float):
    from moespec.routing import LossConfig

    cfg = LossConfig()
    for name, w in weights.items():
        getattr(cfg, name).weight = w
    return cfg


def check_logits(model, ids: torch.Tensor) -> None:
    from moespec.models.hf import attach

    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            ref = _outputs(model, ids)
        cfg = _loss_config(aux=1e-2, orthogonality=1e-2, variance=1e-2, z=1e-3)
        with attach(model, cfg), torch.no_grad():
            got = _outputs(model, ids)
        err = (got - ref).abs().max().item()
        if err > 1e-5:
            raise AssertionError(f"logits differ by {err:.2e} ({'train' if mode else 'eval'})")


def reference_raw_outputs(experts, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slow reference [T,k,H]: the model's eager experts, one token and one expert at a time."""
    from moespec.models.experts import own_implementation

    eager = own_implementation(experts, "eager")
    one = torch.ones(1, 1, dtype=x.dtype)
    rows = []
    for t in range(x.shape[0]):
        rows.append(
            torch.stack(
                [
                    eager(experts, x[t : t + 1], idx[t : t + 1, j : j + 1], one)[0]
                    for j in range(idx.shape[1])
                ]
            )
        )
    return torch.stack(rows)


def check_losses(model, ids: torch.Tensor) -> None:
    from moespec.hooks import HookRegistry
    from moespec.models.hf import attach
    from moespec.routing import losses as L

    model.train()
    seen: dict[int, dict[str, torch.Tensor]] = {}
    reg = HookRegistry()
    cfg = _loss_config(aux=1e-2, orthogonality=1e-2, variance=1e-2, z=1e-3)
    with attach(model, cfg) as handle, torch.no_grad():
        for i, p in enumerate(handle.probes):
            rec = seen.setdefault(i, {})

            def router_hook(m, a, o, rec=rec):
                rec["first"] = (o[0] if isinstance(o, tuple) else o).detach()

            def experts_hook(m, a, kw, rec=rec):
                args = list(a) + list(kw.values())
                rec["x"], rec["idx"] = args[0].detach(), args[1].detach()

            reg.add_forward("check", p.gate, router_hook)
            reg.add_forward_pre("check", p.experts, experts_hook, with_kwargs=True)
        with reg.group("check"):
            _outputs(model, ids)
        # blocks for another modality (ernie4_5_vl_moe's vision experts) see no text token
        used = [i for i, rec in seen.items() if "x" in rec]
        if not used:
            raise AssertionError("no MoE block ran")
        for i in used:
            p, rec = handle.probes[i], seen[i]
            first = rec["first"].reshape(-1, p.num_experts).float()
            if p.spec.router_output == "probs":
                scores, logits = first, first.clamp_min(1e-20).log()
            elif p.config.score_func == "sigmoid":
                s = first.sigmoid()
                scores, logits = s / s.sum(-1, keepdim=True), first
            else:
                scores, logits = first.softmax(-1), first
            idx = rec["idx"]
            raw = reference_raw_outputs(p.experts, rec["x"], idx).float()
            expected = {
                "aux": L.load_balancing_loss(scores, idx, p.num_experts),
                "variance": L.variance_loss(scores),
                "z": L.z_loss(logits),
                "orthogonality": L.orthogonality_loss(raw, "projection"),
            }
            for name, value in expected.items():
                got = p.raw_losses[name].detach().float()
                if not torch.allclose(got, value, atol=1e-6, rtol=1e-3):
                    raise AssertionError(
                        f"layer {i} {name}: {got.item():.6g} != {value.item():.6g}"
                    )


def check_train(model, ids: torch.Tensor) -> list[float]:
    from omegaconf import OmegaConf

    from moespec.models.hf import attach
    from moespec.models.tiny import lm_output
    from moespec.routing import LossConfig

    loss_cfg = OmegaConf.merge(
        OmegaConf.structured(LossConfig), OmegaConf.load(ROOT / "recipes/loss/specialization.yaml")
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    with attach(model, loss_cfg) as handle:
        for _ in range(3):
            logits = _outputs(model, ids)
            lm = lm_output(logits[:, :-1], ids[:, 1:]).loss
            total = lm + handle.collect_losses().total
            opt.zero_grad()
            total.backward()
            opt.step()
            totals.append(float(total))
    if not all(torch.isfinite(torch.tensor(totals))):
        raise AssertionError(f"non-finite loss {totals}")
    return totals


def check_export(model, ids: torch.Tensor) -> None:
    from moespec.models.hf import save_hf_model

    model.eval()
    with torch.no_grad():
        ref = _outputs(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(model, tmp)
        plain = type(model).from_pretrained(tmp, dtype=torch.float32).eval()
    with torch.no_grad():
        got = _outputs(plain, ids)
    err = (got - ref).abs().max().item()
    if err > 1e-5:
        raise AssertionError(f"reloaded logits differ by {err:.2e}")


def _reason(err: BaseException) -> str:
    text = (str(err).splitlines() or [""])[0].strip()
    if "validation error" in text.lower():
        cause = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
        text = cause[0] if cause else text
    text = text.replace("|", "/")
    return f"{type(err).__name__}: {text[:160]}"


def check_family(family: str, model_types: list[str]) -> dict:
    """Every column for one family; the first model type that builds is the one checked."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    row = {"family": family, "model_type": model_types[0], "blocks": 0, "reason": ""}
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    build_errors = []
    for mt in model_types:
        try:
            model = tiny_moe_model(mt)
            _outputs(model, ids)
            row["model_type"] = mt
            break
        except Exception as err:  # noqa: BLE001 - reported in the table
            build_errors.append(err)
    else:
        row["reason"] = "tiny build: " + _reason(build_errors[0])
        return row
    steps = (
        ("attach", lambda: row.update(blocks=_count_blocks(model))),
        ("logits", lambda: check_logits(model, ids)),
        ("losses", lambda: check_losses(model, ids)),
        ("train", lambda: row.update(train_losses=check_train(model, ids))),
        ("export", lambda: check_export(model, ids)),
    )
    for name, step in steps:
        try:
            step()
            row[name] = True
        except Exception as err:  # noqa: BLE001 - reported in the table
            row[name] = False
            row["reason"] = row["reason"] or f"{name}: {_reason(err)}"
    return row


def _count_blocks(model) -> int:
    from moespec.models.hf import moe_blocks

    return len(moe_blocks(model)[2])


def _preload() -> None:
    """Import what every family needs once, so each forked worker starts warm."""
    import transformers.generation  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers.modeling_utils import unwrap_model

    import moespec.models.hf  # noqa: F401
    import moespec.routing  # noqa: F401

    unwrap_model(torch.nn.Linear(1, 1))  # imports accelerate's model helpers


def _worker(family: str, model_types: list[str], cpu_limit: float, conn) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    cpu = int(cpu_limit)  # a forked child's CPU time starts at 0
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))  # SIGXCPU, whatever the load
    try:
        row = check_family(family, model_types)
    except BaseException as err:  # noqa: BLE001 - reported in the table
        row = {"family": family, "model_type": family, "blocks": 0, "reason": _reason(err)}
    conn.send(row)
    conn.close()


def _failed(family: str, reason: str) -> dict:
    return {"family": family, "model_type": family, "blocks": 0, "reason": reason}


def run_families(
    families: dict[str, list[str]], todo: list[str], jobs: int, timeout: float
) -> Iterator[dict]:
    """Check each family in its own forked process (``jobs`` at once), yielding rows in order."""
    ctx = mp.get_context("fork")
    pending, running, done = list(todo), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            family = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(family, families[family], timeout, send))
            proc.start()
            send.close()
            running[family] = (proc, recv, time.perf_counter())
        wait([r for _, r, _ in running.values()], timeout=5)
        for family, (proc, recv, started) in list(running.items()):
            if recv.poll():
                try:
                    done[family] = recv.recv()
                except EOFError:
                    proc.join()
                    over = proc.exitcode == -signal.SIGXCPU
                    why = f"over {timeout:.0f} CPU s" if over else f"crashed (exit {proc.exitcode})"
                    done[family] = _failed(family, why)
            elif time.perf_counter() - started > WALL_PER_CPU * timeout:
                proc.kill()
                done[family] = _failed(family, f"timeout {WALL_PER_CPU * timeout:.0f} s")
            else:
                continue
            proc.join()
            del running[family]
        while todo and todo[0] in done:
            yield done.pop(todo.pop(0))


def markdown(rows: list[dict], command: str, seconds: float, note: str = "") -> str:
    import transformers

    passed = [r for r in rows if all(r.get(c) for c in COLUMNS)]
    lines = [
        TABLE_START,
        f"`{command}` (transformers {transformers.__version__}, torch {torch.__version__}, CPU, "
        f"{seconds:.0f} s{note}): **{len(passed)} of {len(rows)} families pass every column.**",
        "",
        "| family | model type | MoE blocks | " + " | ".join((*COLUMNS, AUTOEP)) + " | reason |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1) + "---|",
    ]
    for r in rows:
        shown = (*COLUMNS, AUTOEP)
        marks = " | ".join("yes" if r.get(c) else ("no" if c in r else "-") for c in shown)
        lines.append(
            f"| {r['family']} | {r['model_type']} | {r['blocks']} | {marks} | {r['reason']} |"
        )
    lines.append(TABLE_END)
    return "\n".join(lines)


def read_rows(path: Path) -> dict[str, dict]:
    """The rows of the table already in ``path`` (to keep the families a run did not check)."""
    text = path.read_text() if path.is_file() else ""
    if TABLE_START not in text:
        return {}
    rows = {}
    for line in text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (4 + len(COLUMNS), 5 + len(COLUMNS)) or cells[0] in ("family", "---"):
            continue  # (tables written before the autoep column have one cell less)
        row = {"family": cells[0], "model_type": cells[1], "blocks": int(cells[2] or 0)}
        shown = (*COLUMNS, AUTOEP)[: len(cells) - 4]
        row.update({c: v == "yes" for c, v in zip(shown, cells[3:-1], strict=True) if v != "-"})
        rows[cells[0]] = {**row, "reason": cells[-1]}
    return rows


def merge_rows(rows: list[dict], previous: dict[str, dict], order: list[str]) -> list[dict]:
    """``rows`` in place of their families' rows in ``previous``, in ``order``."""
    fresh = {r["family"]: r for r in rows}
    return [fresh.get(f) or previous[f] for f in order if f in fresh or f in previous]


def write_table(path: Path, table: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + table + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Coverage\n\n" + table + "\n"
    path.write_text(text)


def launch_ranks(script: Path, families: str, timeout: float, prefix: str) -> dict[str, dict]:
    """One ``torchrun`` launch of ``EP_RANKS`` ranks of ``script OUT.json FAMILIES``; its
    ``{family: {"ok", "reason"}}``, with a family it never reached failing with the reason."""
    from moespec.train.launch import torchrun_launcher

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [*torchrun_launcher(EP_RANKS), str(script), str(out), families]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, check=False, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
            ended = f"exit {proc.returncode}"
            print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)))
        except subprocess.TimeoutExpired:
            ended = f"timeout {timeout:.0f} s"
        results = json.loads(out.read_text()) if out.is_file() else {}
    missed = {"ok": False, "reason": f"launch ended first ({ended})"}
    return {f.split(":")[0]: results.get(f.split(":")[0], missed) for f in families.split(",")}


def run_expert_parallel(rows: list[dict], timeout: float) -> None:
    """The ``ep`` column: one 2-rank launch over every family that attached."""
    todo = [r for r in rows if r.get("attach")]
    if not todo:
        return
    families = ",".join(f"{r['family']}:{r['model_type']}" for r in todo)
    results = launch_ranks(ROOT / "scripts/hf_coverage_ep.py", families, timeout, "ep ")
    for r in todo:
        res = results[r["family"]]
        r["ep"] = res["ok"]
        if not res["ok"] and not r["reason"]:
            r["reason"] = f"ep: {res['reason']}"


def run_autoep(rows: list[dict], timeout: float, families: dict[str, list[str]]) -> None:
    """The ``autoep`` column: one 2-rank launch over the families AutoEP has a preset for."""
    from moespec.models.autoep import preset_for

    def has_preset(family: str) -> bool:
        return any(preset_for(t) for t in families.get(family, []))

    todo = [r for r in rows if r.get("attach") and has_preset(r["family"])]
    if not todo:
        return
    names = ",".join(r["family"] for r in todo)
    results = launch_ranks(ROOT / "tests/workers/autoep_check.py", names, timeout, "autoep ")
    for r in todo:
        res = results[r["family"]]
        r[AUTOEP] = res["ok"]
        if not res["ok"]:
            r["reason"] = "; ".join(x for x in (r["reason"], f"autoep: {res['reason']}") if x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="families checked at once")
    parser.add_argument("--timeout", type=float, default=300, help="CPU seconds per family")
    parser.add_argument("--write", default="", help="markdown file to write the table into")
    parser.add_argument("--ep-timeout", type=float, default=1800, help="seconds for the ep launch")
    parser.add_argument("--no-ep", action="store_true", help="skip the expert-parallel column")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    families = moe_families()
    only = [f for f in args.only.split(",") if f]
    unknown = [f for f in only if f not in families]
    if unknown:
        parser.error(f"unknown families {unknown}; valid: {', '.join(families)}")
    start = time.perf_counter()
    rows = []
    command = "python scripts/hf_coverage.py" + (f" --only {args.only}" if only else "")
    command += " --no-ep" if args.no_ep else ""
    todo = only or list(families)
    # with --only, the other families keep their rows of the table already written
    previous = read_rows(Path(args.write)) if args.write and only else {}
    note = "; the other rows are from an earlier full run" if previous else ""
    _preload()
    for row in run_families(families, list(todo), args.jobs, args.timeout):
        ok = all(row.get(c) for c in COLUMNS[:-1])
        print(f"{row['family']:24s} {'PASS' if ok else 'FAIL'} {row['reason']}", flush=True)
        rows.append(row)
        if args.write:  # after each family, so an interrupted run keeps what it checked
            done = f"{len(rows)} of {len(todo)} checked"
            merged = merge_rows(rows, previous, list(families))
            table = markdown(merged, command, _since(start), note)
            write_table(
                Path(args.write), table.replace(" families pass", f" families ({done}) pass")
            )
    if not args.no_ep:
        run_expert_parallel(rows, args.ep_timeout)
        run_autoep(rows, args.ep_timeout, families)
    table = markdown(merge_rows(rows, previous, list(families)), command, _since(start), note)
    if args.write:
        write_table(Path(args.write), table)
    print(table)


def _since(start: float) -> float:
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
