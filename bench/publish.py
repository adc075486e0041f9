"""Published numbers: immutable snapshots under ``docs/benchmarks/``, and the pages made from them.

    python -m bench.publish bench                 # bench/results/*.json → a bench snapshot
    python -m bench.publish record-demo ...       # make demo's last step: its record, artifacts/demo.json
    python -m bench.publish demo artifacts/demo.json   # that record → a demo snapshot
    python -m bench.publish regenerate [--check]  # the index and README.md's blocks, from snapshots

A snapshot is ``DATE_MACHINE_COMMIT_KIND.json`` (what was measured, with its provenance) and a
``.md`` beside it for people. It is never rewritten. ``docs/benchmarks/README.md`` and the blocks
of ``README.md`` between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->``
are made from the snapshots alone, so no number a user reads is typed by hand; ``--check``
(and a test) fails when the committed pages differ from what the snapshots give.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.summary import load_results, summary
from bibo_export.io import atomic_write_text
from bibo_export.provenance import machine_slug, provenance
from bibo_export.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path("docs/benchmarks")
INDEX = SNAPSHOTS / "README.md"
README = Path("README.md")
KINDS = ("bench", "demo")
# The runtime rows the README shows: batch-1 speed of the `bench` preset in each runtime.
BENCH_SECTIONS = (("onnx", "bench"), ("executorch", "bench"))


class PublishError(Exception):
    """A publishing mistake the user can fix: printed as one line."""


# --- snapshots -----------------------------------------------------------------------------

def snapshot_name(record: dict[str, Any], kind: str) -> str:
    source = record["provenance"]
    commit = source["commit"][:7] + ("-dirty" if source.get("dirty") else "")
    return f"{source['utc'][:10]}_{machine_slug(source)}_{commit}_{kind}"


def describe_provenance(source: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in source["versions"].items())
    if "training_versions" in source:
        versions += "; trained with " + ", ".join(
            f"{name} {version}" for name, version in source["training_versions"].items())
    dirty = " (uncommitted changes)" if source.get("dirty") else ""
    gpu = f", GPU {source['gpu']}" if source.get("gpu") else ", no GPU"
    return (f"Commit `{source['commit'][:12]}`{dirty}, {source['utc']}; {source['cpu']}, "
            f"{source['cores']} cores{gpu}; Python {source['python']}, {versions}.")


def write_snapshot(root: Path, record: dict[str, Any], markdown: str) -> Path:
    """Write ``record`` and its page as a new snapshot; an existing one is never replaced."""
    name = snapshot_name(record, record["kind"])
    folder = root / SNAPSHOTS
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    if json_path.exists() or md_path.exists():
        raise PublishError(f"snapshot {json_path} already exists: snapshots are never rewritten "
                           "(measure again, or publish from another commit)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md_path, markdown)
    atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    return json_path


def load_snapshots(root: Path, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, record) of every snapshot of ``kind``, oldest first."""
    snapshots = [(path.stem, json.loads(path.read_text()))
                 for path in sorted((root / SNAPSHOTS).glob(f"*_{kind}.json"))]
    return sorted(snapshots, key=lambda item: item[1]["provenance"]["utc"])


def measured_provenance(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where the results were measured, from the provenance each section recorded: one commit
    and tree state for all (else they are not one run), the earliest time, and the versions of
    every environment that measured (the XLA sections add torch_xla)."""
    sources = [payload["machine"] for sections in results.values()
               for payload in sections.values()
               if isinstance(payload, dict) and "commit" in payload.get("machine", {})]
    if not sources:
        raise PublishError("bench/results records no provenance: run the benchmarks again")
    if len({(source["commit"], source["dirty"]) for source in sources}) > 1:
        raise PublishError("bench/results mixes runs of different code: run make bench (it "
                           "starts from an empty bench/results) and publish that")
    versions: dict[str, str] = {}
    for source in sources:
        versions.update(source["versions"])
    first = {key: value for key, value in sources[0].items() if key != "threads"}
    return {**first, "utc": min(source["utc"] for source in sources), "versions": versions}


def publish_bench(root: Path) -> Path:
    results = load_results()
    if not results:
        raise PublishError("no benchmark results in bench/results: run make bench (or one "
                           "bench-* target) first")
    record = {"kind": "bench", "provenance": measured_provenance(results), "results": results}
    title = f"# Benchmarks, {record['provenance']['utc'][:10]}"
    page = "\n".join([title, "", describe_provenance(record["provenance"]), "",
                      summary(results, title="").lstrip()])
    return write_snapshot(root, record, page)


def demo_page(record: dict[str, Any]) -> str:
    report = record["report"]
    return "\n".join([
        f"# make demo, {record['provenance']['utc'][:10]}", "",
        describe_provenance(record["provenance"]), "",
        f"Wall time after set-up: {minutes(record['wall_s'])} (training "
        f"{minutes(record['train_s'])}).", "",
        f"Checkpoint `{report['checkpoint']}`, compared with eager PyTorch on the same inputs:",
        "", markdown_table(report["rows"]), "",
        "All bars met." if report["passed"] else "SOME BARS FAILED.", ""])


def environment_versions(python: Path) -> dict[str, str]:
    """PACKAGES' versions in another environment (the one that trained), asked of its Python."""
    return json.loads(subprocess.run(
        [str(python), "-c", "import json; from bibo_export.provenance import package_versions; "
                            "print(json.dumps(package_versions()))"],
        capture_output=True, text=True, check=True).stdout)


def record_demo(started: float, train_seconds: float, report: Path,
                training_python: Path) -> dict[str, Any]:
    """What ``make demo`` measured: its wall time after set-up and its parity report, with the
    versions of both environments (training ran in the other one)."""
    path = report / "report.json"
    if not path.is_file():
        raise PublishError(f"no parity report at {path}: the demo did not finish")
    source = {**provenance(), "training_versions": environment_versions(training_python)}
    return {"kind": "demo", "provenance": source, "wall_s": time.time() - started,
            "train_s": train_seconds, "report": json.loads(path.read_text())}


def publish_demo(root: Path, record_path: Path) -> Path:
    if not record_path.is_file():
        raise PublishError(f"no demo record at {record_path}: run make demo first")
    record = json.loads(record_path.read_text())
    if record.get("kind") != "demo":
        raise PublishError(f"{record_path} is not a demo record")
    return write_snapshot(root, record, demo_page(record))


# --- pages made from the snapshots ----------------------------------------------------------

def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s" if seconds >= 60 \
        else f"{seconds:.0f} s"


def spread(values: list[float], show: Callable[[float], str]) -> str:
    """One value, or the range of several."""
    low, high = min(values), max(values)
    return show(low) if len(values) == 1 or show(low) == show(high) else \
        f"{show(low)} – {show(high)}"


def link(name: str, prefix: str) -> str:
    """A snapshot's link, labelled by its date and commit (DATE_MACHINE_COMMIT_KIND)."""
    date, _, commit, _ = name.split("_")
    return f"[{date} {commit}]({prefix}{name}.md)"


def speed(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def bench_rows(snapshots: list[tuple[str, dict[str, Any]]]
               ) -> dict[tuple[str, str, str], list]:
    """(machine, benchmark, runtime) → [(snapshot name, row)] over the README's sections: each
    benchmark times its own eager baseline, so rows of different benchmarks stay apart."""
    found: dict[tuple[str, str, str], list] = {}
    for name, record in snapshots:
        machine = machine_slug(record["provenance"])
        for result, section in BENCH_SECTIONS:
            for row in record["results"].get(result, {}).get(section, {}).get("rows", []):
                if "decode_tok_s" in row and "prefill_ms" in row:
                    found.setdefault((machine, result, row["runtime"]), []).append((name, row))
    return found


def latest_machine(snapshots: list[tuple[str, dict[str, Any]]]
                   ) -> list[tuple[str, dict[str, Any]]]:
    """The snapshots made on the machine of the newest one."""
    machine = machine_slug(snapshots[-1][1]["provenance"])
    return [(n, r) for n, r in snapshots if machine_slug(r["provenance"]) == machine]


def bench_block(snapshots: list[tuple[str, dict[str, Any]]], prefix: str,
                scope: str = "of each machine") -> str:
    if not snapshots:
        return "No benchmark snapshot is published yet (`make bench`, then `make bench-publish`)."
    lines = ["Batch 1, the `bench` preset (83.4M parameters, random weights): decode tokens/s and "
             f"prefill ms, as ranges over the published snapshots {scope}.", "",
             "| machine | benchmark | runtime | decode tok/s | prefill ms | snapshots |",
             "|---|---|---|---|---|---|"]
    for (machine, benchmark, runtime), found in bench_rows(snapshots).items():
        rows = [row for _, row in found]
        lines.append(f"| {machine} | `make bench-{benchmark}` | {runtime} | "
                     f"{spread([r['decode_tok_s'] for r in rows], speed)} | "
                     f"{spread([r['prefill_ms'] for r in rows], lambda v: f'{v:.1f}')} | "
                     f"{', '.join(link(name, prefix) for name, _ in found)} |")
    return "\n".join(lines)


def demo_block(snapshots: list[tuple[str, dict[str, Any]]], prefix: str) -> str:
    if not snapshots:
        return "No `make demo` snapshot is published yet (`make demo`, then `make demo-publish`)."
    name, latest = snapshots[-1]
    machine = machine_slug(latest["provenance"])
    same = latest_machine(snapshots)
    eager = latest["report"]["rows"][0]
    accuracy = (f"; the trained model sorts {eager['token_accuracy']:.1%} of held-out tokens "
                f"and {eager['sequence_accuracy']:.1%} of whole sequences"
                if "token_accuracy" in eager else "")
    return "\n".join([
        f"`make demo` on {latest['provenance']['cpu']} ({machine}): "
        f"{spread([r['wall_s'] for _, r in same], minutes)} after set-up "
        f"(training {spread([r['train_s'] for _, r in same], minutes)}), over "
        f"{len(same)} snapshot(s): {', '.join(link(n, prefix) for n, _ in same)}{accuracy}. "
        f"The latest run's parity table ({link(name, prefix)}):", "",
        markdown_table(latest["report"]["rows"])])


def index_page(root: Path) -> str:
    lines = ["# Published results", "",
             "Generated by `make bench-publish` and `make demo-publish` from the snapshots in "
             "this folder; do not edit. Each snapshot records the commit, the time, the "
             "machine and the library versions that produced it; how the numbers are measured "
             "is in [the benchmarks guide](../benchmarks.md).", ""]
    for kind, title, block in (("demo", "make demo", demo_block), ("bench", "Benchmarks",
                                                                     bench_block)):
        snapshots = load_snapshots(root, kind)
        lines += [f"## {title}", "", block(snapshots, ""), "", "| snapshot | UTC | machine | "
                  "commit |", "|---|---|---|---|"]
        lines += [f"| [{name}]({name}.md) | {r['provenance']['utc']} | "
                  f"{r['provenance']['cpu']}, {r['provenance']['cores']} cores"
                  f"{', ' + r['provenance']['gpu'] if r['provenance'].get('gpu') else ''} | "
                  f"`{r['provenance']['commit'][:7]}`{' (dirty)' if r['provenance'].get('dirty') else ''} |"
                  for name, r in reversed(snapshots)]
        lines.append("")
    return "\n".join(lines)


def replace_block(text: str, name: str, content: str) -> str:
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise PublishError(f"README.md needs exactly one {begin} … {end} block")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{content}\n{end}{tail}"


def generated_pages(root: Path) -> dict[Path, str]:
    """Every generated file's expected contents, from the snapshots under ``root``."""
    prefix = f"{SNAPSHOTS.as_posix()}/"
    readme = (root / README).read_text()
    readme = replace_block(readme, "demo", demo_block(load_snapshots(root, "demo"), prefix))
    benches = load_snapshots(root, "bench")
    readme = replace_block(readme, "bench", bench_block(
        latest_machine(benches) if benches else [], prefix,
        f"of the machine that made the newest one (every machine: [{INDEX.as_posix()}]"
        f"({INDEX.as_posix()}))"))
    return {INDEX: index_page(root), README: readme}


def stale_pages(root: Path) -> list[Path]:
    """The generated files whose committed text differs from what the snapshots give."""
    return [path for path, text in generated_pages(root).items()
            if not (root / path).is_file() or (root / path).read_text() != text]


def regenerate(root: Path) -> list[Path]:
    pages = generated_pages(root)
    for path, text in pages.items():
        atomic_write_text(root / path, text)
    return list(pages)


# --- command line ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("bench", help="publish bench/results as a snapshot")
    p = sub.add_parser("record-demo", help="write make demo's record")
    p.add_argument("--started", type=float, required=True, help="the demo's start (Unix time)")
    p.add_argument("--trained", type=float, required=True, help="the end of its training")
    p.add_argument("--report", type=Path, required=True, help="its parity report folder")
    p.add_argument("--training-python", type=Path, required=True,
                   help="the Python of the environment that trained (its versions are recorded)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("demo", help="publish a demo record as a snapshot")
    p.add_argument("record", type=Path)
    p = sub.add_parser("regenerate", help="remake the pages generated from the snapshots")
    p.add_argument("--check", action="store_true", help="only say whether they are up to date")
    args = parser.parse_args(argv)
    try:
        if args.action == "record-demo":
            record = record_demo(args.started, args.trained - args.started, args.report,
                                 args.training_python)
            atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
            print(f"make demo: {minutes(record['wall_s'])} after set-up; recorded in "
                  f"{args.out} (make demo-publish publishes it)")
            return 0
        if args.action == "regenerate" and args.check:
            stale = stale_pages(ROOT)
            for path in stale:
                print(f"{path} differs from what the snapshots give: run python -m "
                      "bench.publish regenerate", file=sys.stderr)
            return 1 if stale else 0
        if args.action in KINDS:
            snapshot = publish_bench(ROOT) if args.action == "bench" else \
                publish_demo(ROOT, args.record)
            print(f"published {snapshot.relative_to(ROOT)} and its .md")
        for path in regenerate(ROOT):
            print(f"regenerated {path}")
        return 0
    except PublishError as error:
        print(f"bench.publish: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
