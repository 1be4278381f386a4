"""gpu_check.py's report: tables of rows written to JSON and markdown after every change, a section
and a row run so that one failure costs only itself, and the time budget rows start within.
Its clock starts when gpu_check imports it, before jax."""

from __future__ import annotations

import json
import os
import time
import traceback

import numpy as np

T_START = time.perf_counter()


def elapsed() -> float:
  return time.perf_counter() - T_START


# ---------------------------------------------------------------------------------------------------
# Report: tables of rows, written to JSON + markdown after every change.


class Report:
  def __init__(self, out_dir: str, meta: dict):
    os.makedirs(out_dir, exist_ok=True)
    self.json_path = os.path.join(out_dir, "gpu_check.json")
    self.md_path = os.path.join(out_dir, "gpu_check.md")
    self.meta, self.sections, self.summary = meta, {}, {}
    self.cur = None

  def section(self, name: str):
    self.cur = self.sections[name] = {"status": "running", "wall_s": None, "notes": [], "tables": {}, "error": None}
    print(f"\n## {name}", flush=True)
    self.save()

  def note(self, text: str):
    print(text, flush=True)
    self.cur["notes"].append(text)
    self.save()

  def row(self, table: str, cols: list, row: dict):
    """cols: [(key, header, format spec)]; row: key -> value (None or missing: '-'; str: as is)."""
    t = self.cur["tables"].setdefault(table, {"cols": cols, "rows": []})
    t["rows"].append(row)
    self.save()

  @staticmethod
  def _cell(v, spec):
    if v is None:
      return "-"
    if isinstance(v, str):
      return v
    try:
      return format(v, spec)
    except (TypeError, ValueError):
      return str(v)

  def table_md(self, title: str, t: dict) -> list[str]:
    cols = t["cols"]
    out = [f"**{title}**", "", "| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(self._cell(r.get(k), s) for k, _, s in cols) + " |" for r in t["rows"]]
    return out + [""]

  def print_tables(self):
    for title, t in self.cur["tables"].items():
      print("\n" + "\n".join(self.table_md(title, t)), flush=True)

  def markdown(self) -> str:
    lines = ["# gpu_check", ""] + [f"- {k}: {v}" for k, v in self.meta.items()] + [""]
    for name, s in self.sections.items():
      wall = f", {s['wall_s']:.1f} s" if s["wall_s"] is not None else ""
      lines += [f"## {name} ({s['status']}{wall})", ""] + [n + "  " for n in s["notes"]] + [""]
      for title, t in s["tables"].items():
        lines += self.table_md(title, t)
      if s["error"]:
        lines += ["```", s["error"].rstrip(), "```", ""]
    if self.summary:
      lines += ["## summary", "", "| metric | value |", "|---|---|"]
      lines += [f"| {k} | {v} |" for k, v in self.summary.items()]
    return "\n".join(lines) + "\n"

  def save(self):
    data = {"meta": self.meta, "sections": self.sections, "summary": self.summary, "elapsed_s": elapsed()}
    for path, text in (
      (self.json_path, json.dumps(data, indent=1, default=_jsonable)),
      (self.md_path, self.markdown()),
    ):
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def run_section(rep: Report, name: str, fn, *args):
  """fn(*args) with its tables printed and its wall time recorded whatever happens; None on failure."""
  rep.section(name)
  t0 = time.perf_counter()
  out = None
  try:
    out = fn(*args)
    rep.cur["status"] = "ok"
  except Exception:  # noqa: BLE001 -- the next sections must still run
    tb = traceback.format_exc()
    print(tb, flush=True)
    rep.cur["status"], rep.cur["error"] = "FAILED", tb
  rep.cur["wall_s"] = time.perf_counter() - t0
  rep.print_tables()
  print(f"[{name}: {rep.cur['status']}, {rep.cur['wall_s']:.1f} s; {elapsed():.0f} s since start]", flush=True)
  rep.save()
  return out


def guarded(rep: Report, what: str, fn, *args, **kw):
  """One row: fn's result, or None with the traceback printed and noted."""
  try:
    return fn(*args, **kw)
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    rep.note(f"FAILED {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
    return None


class Budget:
  """Rows start only while elapsed() < frac * budget seconds."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def ok(self, rep: Report, frac: float, what: str) -> bool:
    if elapsed() < frac * self.seconds:
      return True
    rep.note(f"skipped (time budget: {elapsed():.0f} s of {self.seconds:.0f} s): {what}")
    return False
