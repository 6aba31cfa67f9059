"""The compare report: a verdict first, then the table, the plots and the pictures behind it.

Plain HTML with inline SVG charts (no plotting dependency); images are PNGs beside it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from genadapt.runs import write_text

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def _svg_lines(series: dict[str, list[tuple[float, float]]], width=420, height=220, x_label="", y_label="", log_x=False) -> str:
    """A small line chart; each series is a list of (x, y)."""
    import math

    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [fx(x) for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, bottom, right, top = 48, height - 30, width - 110, 10

    def sx(v):
        return left + (fx(v) - x0) / (x1 - x0) * (right - left)

    def sy(v):
        return bottom - (v - y0) / (y1 - y0) * (bottom - top)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-size='10' font-family='sans-serif'>"]
    parts.append(f"<line x1='{left}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='#444'/><line x1='{left}' y1='{top}' x2='{left}' y2='{bottom}' stroke='#444'/>")
    parts.append(f"<text x='{left}' y='{height - 5}'>{html.escape(x_label)}</text><text x='2' y='{top + 8}'>{y1:.3g}</text><text x='2' y='{bottom}'>{y0:.3g}</text>")
    parts.append(f"<text x='{left + 4}' y='{top + 8}' fill='#666'>{html.escape(y_label)}</text>")
    for index, (name, values) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{coords}'/>")
        if len(values) < 12:
            parts.extend(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{color}'/>" for x, y in values)
        parts.append(f"<text x='{right + 6}' y='{top + 12 + 13 * index}' fill='{color}'>{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _svg_bars(rows: list[tuple[str, float, float, float]], width=560, label="KID (lower is better)") -> str:
    """Horizontal bars with 95% CI whiskers, one per (name, value, low, high)."""
    if not rows:
        return ""
    top = max(high for _, _, _, high in rows) or 1.0
    left, right, height = 130, width - 20, 24 * len(rows) + 30

    def sx(v):
        return left + max(0.0, v) / top * (right - left)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-size='11' font-family='sans-serif'>"]
    for index, (name, value, low, high) in enumerate(rows):
        y = 8 + 24 * index
        color = "#999" if name.startswith("base") else COLORS[index % len(COLORS)]
        parts.append(f"<text x='4' y='{y + 12}'>{html.escape(name)}</text>")
        parts.append(f"<rect x='{left}' y='{y}' width='{sx(value) - left:.1f}' height='16' fill='{color}' opacity='.75'/>")
        parts.append(f"<line x1='{sx(low):.1f}' x2='{sx(high):.1f}' y1='{y + 8}' y2='{y + 8}' stroke='#222'/>")
        parts.append(f"<text x='{min(sx(high) + 4, right - 40):.1f}' y='{y + 12}' fill='#333'>{value:.3g}</text>")
    parts.append(f"<text x='{left}' y='{height - 4}' fill='#666'>{html.escape(label)}; whiskers: 95% CI</text></svg>")
    return "".join(parts)


def _kid_rows(results: dict) -> list[tuple[str, float, float, float]]:
    """(name, KID, CI low, CI high) of every run and the base, best first, for `_svg_bars`."""
    rows = []
    for name, run in results["runs"].items():
        kid = run["evaluation"]["kid"]
        rows.append(("base (unadapted)" if name == "base" else run["technique"], kid["value"], kid["ci_low"], kid["ci_high"]))
    return sorted(rows, key=lambda row: row[1])


def _loss_curve(run: Path) -> str:
    path = run / "log.jsonl"
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = [k for k, v in records[0].items() if k != "step" and isinstance(v, (int, float))] if records else []
    series = {}
    for name in names:
        values = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        window = max(1, len(values) // 40)  # smooth: few-shot losses are noisy
        series[name] = [(values[i][0], sum(v for _, v in values[i : i + window]) / len(values[i : i + window])) for i in range(0, len(values), window)]
    return _svg_lines(series, x_label="step", y_label="loss terms")


def _fmt_ci(entry: dict, digits: int) -> str:
    return f"{entry['value']:.{digits}f} <small>[{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]</small>"


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def verdict(results: dict) -> list[str]:
    lines = []
    base_kid = results["runs"]["base"]["evaluation"]["kid"]["value"]
    for advice in results.get("recommendation", []):
        kid = advice["kid"]
        text = f"With {advice['shots']} shot(s): <b>{html.escape(advice['technique'])}</b> — KID {kid['value']:.4f} [{kid['ci_low']:.4f}, {kid['ci_high']:.4f}] vs {base_kid:.4f} unadapted"
        if advice.get("copy_rate") is not None:
            text += f", copies {advice['copy_rate']:.0%} of samples"
        if advice["too_close_to_call_with"]:
            text += f"; too close to call with {', '.join(html.escape(t) for t in advice['too_close_to_call_with'])} (overlapping 95% CIs)"
        if not advice["beats_base"]:
            text += "; <i>not clearly better than the unadapted base</i>"
        lines.append(text + ".")
    return lines


def verdict_text(results: dict) -> list[str]:
    """`verdict` without the HTML emphasis, for a terminal."""
    import re

    return [re.sub(r"</?[bi]>", "", line) for line in verdict(results)]


def write_compare_report(results: dict, out: Path) -> Path:
    from genadapt.data import load_dataset
    from genadapt.grid import save_grid

    settings, plan = results["settings"], results["plan"]
    rows, curves = [], {}
    for name, run in results["runs"].items():
        evaluation = run["evaluation"]
        memorisation = evaluation.get("memorisation", {})
        diversity = evaluation.get("intra_cluster_diversity", {})
        rows.append(
            "<tr>"
            f"<td>{html.escape(run['technique'])}</td><td>{run['shots']}</td>"
            f"<td>{_fmt_ci(evaluation['kid'], 4)}</td><td>{_fmt_ci(evaluation['fid'], 1)}</td>"
            f"<td>{evaluation['precision_recall']['precision']:.2f}</td><td>{evaluation['precision_recall']['recall']:.2f}</td>"
            f"<td>{diversity.get('value', float('nan')):.3f}</td><td>{memorisation.get('copy_rate', float('nan')):.0%}</td>"
            f"<td>{run.get('trainable_parameters', 0):,}</td><td>{_size(run.get('artifact_bytes'))}</td><td>{run.get('cpu_minutes', '–')}</td>"
            "</tr>"
        )
        if name != "base":
            curves.setdefault(run["technique"], []).append((run["shots"], evaluation["kid"]["value"]))
    base_kid = results["runs"]["base"]["evaluation"]["kid"]["value"]
    series = {t: sorted(points) for t, points in curves.items()}
    series["base (unadapted)"] = [(min(plan["shots"]), base_kid), (max(plan["shots"]), base_kid)]
    if len(plan["shots"]) > 1:
        quality_plot = _svg_lines(series, x_label="shots (log)", y_label="KID (lower is better)", log_x=True)
    else:
        quality_plot = _svg_bars(_kid_rows(results))

    sections = []
    for shots in plan["shots"]:
        images = load_dataset(settings["data"], resolution=32, shots=shots, seed=settings["seed"])
        save_grid(images.pixels, out / f"shots-{shots}.png", columns=min(5, len(images)), scale=2)
        cards = [f"<figure><img src='shots-{shots}.png'><figcaption>the {shots} training shot(s)</figcaption></figure>"]
        for name, run in results["runs"].items():
            if name == "base" or run["shots"] != shots:
                continue
            folder = f"runs/{name}"
            copies = run["evaluation"].get("memorisation", {}).get("copies", [])
            copy_figure = f"<figure><img src='{folder}/eval/copies.png'><figcaption>{len(copies)} flagged copies: sample | shot</figcaption></figure>" if copies else ""
            cards.append(
                f"<div class='run'><h4>{html.escape(run['technique'])}</h4><figure><img src='{folder}/eval/samples.png'><figcaption>samples</figcaption></figure>"
                f"{copy_figure}<figure>{_loss_curve(out / folder)}<figcaption>training loss</figcaption></figure></div>"
            )
        sections.append(f"<h3>{shots} shot(s)</h3><div class='grid'>{''.join(cards)}</div>")

    dropped = "".join(f"<li>{html.escape(d)}</li>" for d in plan["dropped"]) or "<li>none</li>"
    if plan["seconds_per_step"]:
        plan_text = f"Probe: seconds per step {html.escape(json.dumps(plan['seconds_per_step']))}; seconds per sample {plan['seconds_per_sample']}. Estimated {plan['estimated_minutes']} min."
    else:
        plan_text = f"A fixed {plan['steps']} steps for every run (no timing probe), so the numbers do not depend on the machine's speed."
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>genadapt compare</title>
<style>body{{font-family:system-ui,sans-serif;max-width:72em;margin:1.5em auto;color:#222}}
table{{border-collapse:collapse;font-size:.9em}}td,th{{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.verdict{{background:#f3f7ff;border-left:4px solid #1f77b4;padding:.6em 1em;font-size:1.05em}}
img{{image-rendering:pixelated;max-width:100%}}.grid{{display:flex;flex-wrap:wrap;gap:1em}}.run{{border:1px solid #ddd;padding:.4em}}
figure{{margin:.3em}}figcaption{{font-size:.8em;color:#555}}small{{color:#777}}</style></head><body>
<h1>Which technique fits this data?</h1>
<p>{html.escape(settings['base'])} adapted to <code>{html.escape(settings['data'])}</code>, evaluated against <code>{html.escape(settings['reference'])}</code>
in the feature space <code>{html.escape(results['runs']['base']['evaluation']['features'])}</code>. Every run: {plan['steps']} steps.</p>
<div class='verdict'>{'<br>'.join(verdict(results))}</div>
<h2>{'Quality against shots' if len(plan['shots']) > 1 else 'Quality by technique'}</h2>{quality_plot}
<h2>All runs</h2><table><tr><th>technique</th><th>shots</th><th>KID [95% CI]</th><th>FID [95% CI]</th><th>precision</th><th>recall</th>
<th>intra-cluster diversity</th><th>copy rate</th><th>trainable params</th><th>artifact</th><th>CPU-min</th></tr>{''.join(rows)}</table>
<p><small>KID/FID: lower is better; the CI is a bootstrap 95% interval. Diversity: mean pairwise cosine distance of samples assigned to the same shot (CDC protocol, in the eval encoder's space, not LPIPS).
Copy rate: samples whose nearest shot is 3x closer than the second nearest.</small></p>
{''.join(sections)}
<h2>Plan</h2><p>{plan_text}</p>
<p>Dropped runs:</p><ul>{dropped}</ul></body></html>"""
    return write_text(out / "report.html", page)


def write_demo_index(results: dict[str, dict], out: Path) -> Path:
    """One page over the per-model reports: the verdicts, then links to the evidence."""
    blocks = []
    for base, result in results.items():
        lines = "<br>".join(verdict(result))
        pictures = ""
        for advice in result.get("recommendation", [])[:1]:
            best = f"{advice['technique']}-{advice['shots']}shot"
            pictures = (
                f"<figure><img src='{html.escape(base)}/shots-{advice['shots']}.png'><figcaption>the shots</figcaption></figure>"
                f"<figure><img src='{html.escape(base)}/runs/{best}/eval/samples.png' width='260'><figcaption>{html.escape(advice['technique'])}: samples</figcaption></figure>"
                f"<figure><img src='{html.escape(base)}/base/samples.png' width='260'><figcaption>unadapted base: samples</figcaption></figure>"
            )
        blocks.append(
            f"<h2>{html.escape(base)}</h2><div class='verdict'>{lines}</div>{_svg_bars(_kid_rows(result))}<div class='row'>{pictures}</div>"
            f"<p><a href='{html.escape(base)}/report.html'>full report: every metric, samples of every run, copies, loss curves</a></p>"
        )
    settings = next(iter(results.values()))["settings"]
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>genadapt demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:1.5em auto}}.verdict{{background:#f3f7ff;border-left:4px solid #1f77b4;padding:.6em 1em}}
img{{image-rendering:pixelated}}.row{{display:flex;gap:1em;align-items:flex-end}}figure{{margin:.3em}}figcaption{{font-size:.8em;color:#555}}</style></head><body>
<h1>genadapt demo: which technique fits 10 images?</h1>
<p>Target: <code>{html.escape(settings['data'])}</code>, a domain the pocket models never saw; evaluated against <code>{html.escape(settings['reference'])}</code>.</p>
{''.join(blocks)}</body></html>"""
    return write_text(out / "index.html", page)
