"""The checks a model-library sweep runs on each model (``hf_zoo.py``, ``torchvision_zoo.py``).

``check_model`` takes a built model, its example inputs and its plain eval output, and checks:

* units: the droppable units ``find_blocks`` finds (a sweep compares them with what it expects);
* untouched: ``find_blocks`` leaves every module's ``__dict__``, buffers and hooks as they were;
* eval: the transformed model in eval mode returns bitwise the untransformed output;
* grads: in training, every other unit dropped, a backward pass gives dropped units no gradient;
* remove: ``ctl.remove()`` takes every gate off and the model is as before ``transform``.

``run_in_child`` runs one model's check in a forked child with a timeout, so a crash or a hang
costs one row, not the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import raptr_fx

Forward = Callable[[torch.nn.Module], Any]


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        value = list(value.values()) if isinstance(value, dict) else list(value.to_tuple())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def snapshot(model: torch.nn.Module, values: bool = True) -> dict[str, Any]:
    """What discovery must not change: each module's __dict__ entries (by identity), buffers, hooks."""
    state = {}
    for name, module in model.named_modules():
        entries = {k: id(v) for k, v in vars(module).items() if not k.startswith("_") or k in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks")}
        hooks = {k: list(getattr(module, k).keys()) for k in ("_forward_hooks", "_forward_pre_hooks",
                                                              "_backward_hooks", "_forward_hooks_with_kwargs")}
        buffers = {k: (id(v), v.clone() if v is not None and values else None) for k, v in module._buffers.items()}
        state[name] = (entries, hooks, buffers)
    return state


def same(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """None when the snapshots agree, else the first difference."""
    if before.keys() != after.keys():
        return f"modules {sorted(set(before) ^ set(after))[:3]}"
    for name, (entries, hooks, buffers) in before.items():
        entries2, hooks2, buffers2 = after[name]
        if entries != entries2:
            keys = sorted(k for k in entries.keys() | entries2.keys() if entries.get(k) != entries2.get(k))
            return f"{name or 'model'}.{keys[0]} changed"
        if hooks != hooks2:
            return f"{name or 'model'} hooks changed"
        for key, (ident, value) in buffers.items():
            ident2, value2 = buffers2.get(key, (None, None))
            if ident != ident2 or (value is not None and not torch.equal(value, value2)):
                return f"{name or 'model'} buffer {key} changed"
    return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def check_model(model: torch.nn.Module, example_inputs: Any, forward: Forward,
                reference: list[torch.Tensor]) -> dict[str, Any]:
    """Run the checks above; ``status`` is "checked" when every check passed (the sweep then
    compares ``units`` with what it expects), else the stage that failed and a ``detail``."""
    result: dict[str, Any] = {}
    stage = "find_blocks"
    try:
        before = snapshot(model)
        blocks = raptr_fx.find_blocks(model, example_inputs)
        result["units"] = sum(b.droppable for b in blocks)
        result["unit_names"] = [b.name for b in blocks if b.droppable]
        result["refused"] = [f"{b.name}: {b.reason}" for b in blocks if not b.droppable]
        changed = same(before, snapshot(model))
        if changed:
            return {**result, "status": "changed", "detail": f"find_blocks left the model changed: {changed}"}
        stage = "transform"
        ctl = raptr_fx.transform(model, raptr_fx.FullModel(), example_inputs=example_inputs)
        stage = "eval"
        with torch.no_grad():
            out = tensors(forward(model))
        if len(out) != len(reference) or not all(torch.equal(a, b) for a, b in zip(out, reference)):
            return {**result, "status": "eval differs", "detail": "eval output not bitwise the plain model's"}
        stage = "grads"
        keep = [i % 2 == 1 for i in range(len(ctl.blocks))] if len(ctl.blocks) > 1 else [False]
        with ctl.force(active=keep):
            saved_buffers = {k: v.clone() for k, v in model.named_buffers()}
            model.train()
            loss = sum(t.float().pow(2).mean() for t in tensors(forward(model)) if t.is_floating_point())
            loss.backward()
            modules = dict(model.named_modules())
            for block, kept in zip(ctl.blocks, keep):
                graded = [n for n, p in modules[block.name].named_parameters() if p.grad is not None]
                if not kept and graded:
                    return {**result, "status": "grads", "detail": f"dropped {block.name} got gradients ({graded[0]})"}
        stage = "remove"
        with torch.no_grad():  # training updated running statistics; remove() is checked without them
            for key, buffer in model.named_buffers():
                buffer.copy_(saved_buffers[key])
        model.zero_grad(set_to_none=True)
        model.eval()
        ctl.remove()
        # The training pass may update the model's own caches (recurrent states): remove() is
        # checked on what raptr_fx put there, the forwards and hooks.
        after = snapshot(model, values=False)
        for name, (entries, hooks, _) in before.items():
            if entries.get("forward") != after[name][0].get("forward") or hooks != after[name][1]:
                return {**result, "status": "remove", "detail": f"after remove(): {name or 'model'} forward/hooks"}
        with torch.no_grad():
            out = tensors(forward(model))
        if not all(torch.equal(a, b) for a, b in zip(out, reference)):
            return {**result, "status": "remove", "detail": "output after remove() differs"}
    except raptr_fx.RaptrError as exc:
        return {**result, "status": "refused" if stage == "transform" else f"{stage} error", "detail": one_line(exc)}
    except Exception as exc:
        return {**result, "status": f"{stage} crash", "detail": one_line(exc),
                "where": traceback.format_exc().strip().splitlines()[-3:]}
    return {**result, "status": "checked"}


def run_in_child(check: Callable[[], dict[str, Any]], row: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``check()`` in a forked child; its result, or ``row`` with a timeout or crash status."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run one model, write its result, exit without cleanup
        os.close(read)
        try:
            payload = json.dumps(check(), default=str).encode()
        except BaseException as exc:  # noqa: BLE001 - report anything, never hang the parent
            payload = json.dumps({**row, "status": "crash", "detail": one_line(exc)}).encode()
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    chunks = []
    os.set_blocking(read, False)
    while True:
        try:
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(read)
                return {**row, "status": "timeout", "detail": f"over {timeout:.0f} s"}
            time.sleep(0.05)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {**row, "status": "crash", "detail": f"child died (wait status {status})"}
    return json.loads(b"".join(chunks))


def add_sweep_arguments(parser: argparse.ArgumentParser, example: str, sample: int, timeout: float) -> None:
    """The options every sweep takes."""
    parser.add_argument("--only", help=f"comma-separated names (e.g. {example})")
    parser.add_argument("--sample", action="store_true", help=f"the fixed CI sample ({sample} models)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds per model (default {timeout:.0f})")
    parser.add_argument("--out", help="write the table and summary (markdown) to this file")
    parser.add_argument("--json", help="append the raw results (JSON lines) to this file")


def table(results: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """Markdown: ``columns`` (result key -> heading), then layers, units, status and detail."""
    headings = [*columns.values(), "layers", "units", "status", "detail"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for r in results:
        cells = [*(str(r.get(key, "")) for key in columns), str(r.get("layers", "")), str(r.get("units", "")),
                 r["status"], refusal_detail(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chosen(names: list[str], args: argparse.Namespace, sample: list[str]) -> set[str]:
    """The names ``--only`` or ``--sample`` ask for (all without either); unknown names end the run."""
    if not (args.only or args.sample):
        return set(names)
    wanted = set(args.only.split(",") if args.only else sample)
    if wanted - set(names):
        raise SystemExit(f"unknown model(s) {sorted(wanted - set(names))}")
    return wanted


def report(results: list[dict[str, Any]], columns: dict[str, str], what: str, out: str | None) -> None:
    """Print the table and the summary line, and write them to ``out`` if given."""
    text = f"{table(results, columns)}\n\n{summary(results, what)}\n"
    print("\n" + text)
    if out:
        Path(out).write_text(text)


def sweep(cases: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]], timeout: float,
          json_path: str | None = None) -> list[dict[str, Any]]:
    """Check each (row, check) in a child, print a line per model as it ends; the results."""
    results = []
    for row, check in cases:
        start = time.monotonic()
        result = run_in_child(check, row, timeout)
        result["seconds"] = round(time.monotonic() - start, 1)
        results.append(result)
        label = next(iter(row.values()))
        print(f"{label:32s} {result['status']:14s} {result.get('units', '')!s:>3}/{result.get('layers', '')!s:<3} "
              f"{result['seconds']:6.1f}s  {refusal_detail(result)[:110]}", flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(result, default=str) + "\n")
    return results


def refusal_detail(result: dict[str, Any]) -> str:
    """The table's detail: the first refusals for a model with fewer units, else what failed."""
    detail = result.get("detail") or ""
    if result["status"] == "fewer units" or (result["status"] == "refused" and result.get("refused")):
        refused = result.get("refused") or []
        detail = "; ".join(refused[:2]) + (f"; +{len(refused) - 2} more" if len(refused) > 2 else "")
        if result.get("missing"):
            detail = f"missing {', '.join(result['missing'][:3])}; {detail}"
        elif not refused:
            detail = "nothing refused: the other layers have no residual add, or a unit holds several layers"
    return detail.replace("|", "/").replace("\n", " ")[:240]


def summary(results: list[dict[str, Any]], what: str) -> str:
    """One line: how many of the built models are fully right, have fewer units, are refused or fail."""
    built = [r for r in results if r["status"] != "unbuildable"]
    if all(r["status"] in ("built", "unbuildable") for r in results):  # --build-only
        return f"{len(built)} of {len(results)} {what} build"
    ok = sum(r["status"] == "ok" for r in built)
    fewer = sum(r["status"] == "fewer units" for r in built)
    refused = sum(r["status"] == "refused" for r in built)
    failed = len(built) - ok - fewer - refused
    share = (ok + fewer) / len(built) if built else 0.0
    return (f"{ok} of {len(built)} fully right, {fewer} with fewer units than layers (reasons given), "
            f"{refused} refused with a reason, {failed} failed; {share:.1%} transform and pass every check "
            f"({len(results) - len(built)} unbuildable of {len(results)} {what})")
