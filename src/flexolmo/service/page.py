"""The web page: one server-rendered HTML page of the consortium's state, for members and the coordinator.
No script and no external asset, so it renders the same in any browser and offline."""

from __future__ import annotations

from html import escape

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;font-size:.9em;vertical-align:top}
th{background:#f0f0f0}.refused,.withdrawn{color:#a00}.admitted,.published{color:#070}.pending,.publishing{color:#a60}
code{font-size:.85em}"""


def _table(table_id: str, headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body or ""}</table>'


def _badge(state: str) -> str:
    return f'<span class="{escape(state)}">{escape(state)}</span>'


def _reasons(report: dict) -> str:
    reasons = [report.get("refused", "")] if report.get("refused") else []
    for verdict in report.get("verdicts", []):
        ratio = verdict.get("row_norm_ratio")
        reasons.append(f"row norm / public {ratio:.2f}" if ratio is not None else "")
    return escape("; ".join(r for r in reasons if r))


def _sections(state: dict) -> list[str]:
    members = [[escape(m["name"]), f"<code>{m['key_id'][:16]}</code>", _badge(m["status"])]
               for m in state["members"]]
    submissions = [[str(s["id"]), escape(s["member"]), f"<code>{s['package_sha256'][:16]}</code>",
                    _badge(s["status"]), _reasons(s["report"]),
                    escape(s.get("declaration", {}).get("licence", ""))] for s in state["submissions"]]
    versions = [[str(v["number"]), _badge(v["status"]), escape(", ".join(e["name"] for e in v["experts"])),
                 f"<code>{(v['output_sha256'] or '')[:16]}</code>"] for v in state["versions"]]
    withdrawals = [[escape(w["member"]), f"<code>{w['package_sha256'][:16]}</code>"] for w in state["withdrawals"]]
    log = [[str(e["seq"]), escape(e["time"]), escape(e["kind"]), escape(e["actor"]),
            f"<code>{e['hash'][:16]}</code>"] for e in state.get("log", [])]
    return [
        "<h2>Members</h2>" + _table("members", ["member", "key id", "status"], members),
        "<h2>Submissions</h2>" + _table("submissions", ["#", "member", "package", "admission", "reasons",
                                                         "declared licence"],
                                        submissions),
        "<h2>Versions</h2>" + _table("versions", ["version", "status", "experts", "output digest"], versions),
        "<h2>Withdrawals</h2>" + _table("withdrawals", ["member", "package"], withdrawals),
        "<h2>Audit log</h2>" + _table("log", ["seq", "time", "event", "actor", "hash"], log),
    ]


def render_page(state: dict) -> str:
    body = "\n".join(_sections(state))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>FlexOlmo consortium</title>"
            f"<style>{_STYLE}</style></head><body><h1>FlexOlmo consortium</h1>"
            f"<p>Active set version <b id='active-set'>{state['active_set_version']}</b></p>{body}</body></html>")
