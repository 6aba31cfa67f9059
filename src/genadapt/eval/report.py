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
    """(name, mean KID, lowest and highest replicate) per technique at the largest shot count, best first, for `_svg_bars`."""
    rows = []
    for advice in results.get("recommendation", [])[-1:]:
        for technique, row in advice["techniques"].items():
            kids = row["kid_per_replicate"]
            rows.append((technique, row["kid"], min(kids), max(kids)))
        base = [run["evaluation"]["kid"]["value"] for name, run in results["runs"].items() if name.startswith(f"base-{advice['shots']}shot-")]
        rows.append(("base (unadapted)", sum(base) / len(base), min(base), max(base)))
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


def _validation_curve(run: Path) -> str:
    """Validation KID and copy rate against step (validation.jsonl), with the kept best step marked."""
    path = run / "validation.jsonl"
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return ""
    series = {"validation KID": [(r["step"], r["kid"]) for r in records], "copy rate": [(r["step"], r["copy_rate"]) for r in records]}
    best = [r["step"] for r in records if r["best"]]
    note = f"<br><small>kept: step {best[-1]}</small>" if best else "<br><small>no check under the copy ceiling</small>"
    return _svg_lines(series, x_label="step", y_label="KID / copy rate") + note


def _fmt_ci(entry: dict, digits: int) -> str:
    return f"{entry['value']:.{digits}f} <small>[{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]</small>"


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _yardsticks(results: dict) -> str:
    """Which diversity set each shot count's floor, as results.json records it."""
    parts = []
    for advice in results.get("recommendation", []):
        kind = advice.get("rule", {}).get("diversity_yardstick")
        if kind is not None:
            parts.append(f"{advice['shots']} shot(s): the {kind}'s {advice[f'{kind}_diversity']:.3f}")
    return f" (here: {'; '.join(parts)})" if parts else ""


def _delta(result: dict) -> str:
    return f"{result['difference']:+.4f} [{result['ci_low']:+.4f}, {result['ci_high']:+.4f}]"


def worse_than_base(advice: dict) -> bool:
    """The recommended technique's paired interval against the unadapted base lies above 0 (results written before
    the field existed are read from the interval)."""
    pick = advice.get("technique")
    return pick is not None and advice.get("worse_than_base", advice["techniques"][pick]["vs_base"]["ci_low"] > 0)


def _option_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def verdict(results: dict) -> list[str]:
    """Per shot count, a sentence a user can act on: what to use, with what settings, beating what by how much,
    what ties it and why the recommendation among the tied, and what the run could not have detected."""
    lines = []
    settings = results.get("settings", {})
    for advice in results.get("recommendation", []):
        shots, table = advice["shots"], advice["techniques"]
        pick = advice.get("technique")
        disqualified = [f"{html.escape(t)} ({'; '.join(row['disqualified'])})" for t, row in table.items() if row["disqualified"]]
        if pick is None:
            lines.append(f"With {shots} shot(s): no technique qualifies: {', '.join(disqualified)}.")
            continue
        options = ", ".join(f"{k.replace('_', '-')} {_option_value(v)}" for k, v in advice.get("settings", {}).items())
        vs_base = table[pick]["vs_base"]
        if worse_than_base(advice):
            text = (f"With {shots} shot(s) keep the <b>unadapted base</b>: the best qualified technique, {html.escape(pick)}"
                    + (f" ({html.escape(options)})" if options else "")
                    + f", is worse than it (KID {table[pick]['kid']:.4f} against the base's {advice['base_kid']:.4f}, Δ {_delta(vs_base)}); "
                    "adapting to these shots moved every qualified technique away from the reference")
            if disqualified:
                text += f". Disqualified: {', '.join(disqualified)}"
            lines.append(text + ".")
            continue
        text = f"With {shots} shot(s) use <b>{html.escape(pick)}</b>" + (f" ({html.escape(options)})" if options else "")
        winner = advice["fidelity_winner"]
        # The rule's evidence is the winner's: the lowest KID beats some techniques and is tied with the rest, and
        # the pick is the cheapest of the tied. Every Δ names its pair (comparisons hold winner − technique).
        beaten = [f"{html.escape(t)} by {-c['difference']:.4f} KID [{-c['ci_high']:.4f}, {-c['ci_low']:.4f}]"
                  for t, c in advice["comparisons"].items() if t not in advice["tied_with"]]
        text += f": KID {table[pick]['kid']:.4f} (base {advice['base_kid']:.4f}), copies {table[pick]['copy_rate']:.0%}"
        against_base = [f"the unadapted base by {-vs_base['difference']:.4f} [{-vs_base['ci_high']:.4f}, {-vs_base['ci_low']:.4f}]"] if advice["beats_base"] else []
        if pick == winner and beaten + against_base:
            text += "; it beats " + ", ".join(beaten + against_base)
        elif pick != winner:
            if against_base:
                text += "; it beats " + against_base[0]
            text += f"; the lowest KID is {html.escape(winner)}'s" + (f", which beats {', '.join(beaten)}" if beaten else "")
        if not advice["beats_base"]:
            text += f"; <i>not clearly better than the unadapted base</i> (Δ {_delta(vs_base)})"
        ties = [t for t in [winner, *advice["tied_with"]] if t != pick]
        if ties:
            def tie(t: str) -> str:
                other = pick if t == winner else t
                return f"{html.escape(winner)} − {html.escape(other)} {_delta(advice['comparisons'][other])}"

            tied_text = ", ".join(f"{html.escape(t)}{' (lowest KID)' if t == winner else ''} (Δ {tie(t)})" for t in ties)
            sizes = ", ".join(f"{html.escape(t)} {_size(int(table[t]['artifact_bytes']))}" for t in ties)
            excluded = [t for t in ties if table[t]["vs_base"]["ci_high"] >= 0]
            if advice["beats_base"] and excluded:
                text += (f"; tied with {tied_text}; {html.escape(pick)} is the cheapest of the tied that clearly beat the base "
                         f"({', '.join(html.escape(t) for t in excluded)} {'does' if len(excluded) == 1 else 'do'} not)")
            else:
                text += f"; tied with {tied_text}; {html.escape(pick)} is the cheapest of the tied ({_size(int(table[pick]['artifact_bytes']))} vs {sizes})"
        text += (f". Differences under {advice['detectable']:.4f} KID could not be detected with {settings.get('samples', '?')} samples"
                 f" x {table[pick]['replicates']} replicate(s)")
        if disqualified:
            text += f". Disqualified: {', '.join(disqualified)}"
        lines.append(text + ".")
    return lines


def verdict_text(results: dict) -> list[str]:
    """`verdict` without the HTML emphasis, for a terminal."""
    import re

    return [html.unescape(re.sub(r"</?[bi]>", "", line)) for line in verdict(results)]


def _lr_probe_section(probe: dict | None) -> str:
    """The learning-rate sweep: validation KID against rate per technique, and the rate each technique trained at."""
    if not probe:
        return "<h2>Learning rate</h2><p>No probe (--lr-probe 1): every technique trained at its default rate.</p>"
    rows, series = [], {}
    for technique, sweep in probe["techniques"].items():
        cells = "".join(
            f"<td>{rate:.2g}: {'—' if kid is None else f'{kid:.4f}'}{'' if step is None else f' <small>@{step}</small>'}</td>"
            for rate, kid, step in zip(sweep["rates"], sweep["kid"], sweep["best_step"])
        )
        chosen = "—" if sweep["chosen"] is None else f"<b>{sweep['chosen']:.2g}</b>"
        default = "" if sweep["default"] is None else f" <small>(default {sweep['default']:.2g})</small>"
        failed = f" <small>failed: {html.escape('; '.join(sweep['failed']))}</small>" if sweep["failed"] else ""
        rows.append(f"<tr><td>{html.escape(technique)}</td>{cells}<td>{chosen}{default}{failed}</td></tr>")
        points = [(rate, kid) for rate, kid in zip(sweep["rates"], sweep["kid"]) if kid is not None]
        if points:
            series[technique] = points
    plot = _svg_lines(series, x_label="learning rate (log)", y_label="best validation KID", log_x=True)
    return (f"<h2>Learning rate</h2><p>Before the runs, each technique trained {probe['steps']} steps on {probe['shots']} shots at each rate "
            f"({probe['factor']:g}x apart); each was scored by validation KID on held-out pool images (never the reference), and the best rate "
            f"under the copy ceiling trained every run of that technique.</p>{plot}"
            f"<table><tr><th>technique</th>{'<th>rate: validation KID @ step</th>' * max(len(s['rates']) for s in probe['techniques'].values())}"
            f"<th>trained at</th></tr>{''.join(rows)}</table>")


def write_compare_report(results: dict, out: Path) -> Path:
    from genadapt.data import load_dataset
    from genadapt.grid import save_grid

    settings, plan = results["settings"], results["plan"]
    rows, series, evidence = [], {}, []
    for advice in results.get("recommendation", []):
        for technique, row in sorted(advice["techniques"].items(), key=lambda item: item[1]["kid"]):
            kids = row["kid_per_replicate"]
            spread = f"<small>[{min(kids):.4f} – {max(kids):.4f}]</small>" if len(kids) > 1 else ""
            status = "disqualified: " + html.escape("; ".join(row["disqualified"])) if row["disqualified"] else (("<b>best, worse than the base</b>" if worse_than_base(advice) else "<b>recommended</b>") if technique == advice.get("technique") else "")
            rows.append(
                f"<tr><td>{html.escape(technique)}</td><td>{advice['shots']}</td><td>{row['kid']:.4f} {spread}</td><td>{row['replicates']}</td>"
                f"<td>{_delta(row['vs_base'])}</td><td>{row['diversity']:.3f}</td><td>{row['copy_rate']:.0%}</td>"
                f"<td>{row['trainable_parameters']:,}</td><td>{_size(int(row['artifact_bytes']))}</td><td>{row['cpu_minutes']:.2f}</td><td>{status}</td></tr>"
            )
            series.setdefault(technique, []).append((advice["shots"], row["kid"]))
        series.setdefault("base (unadapted)", []).append((advice["shots"], advice["base_kid"]))
        for other, comparison in advice.get("comparisons", {}).items():
            tied = "tied" if other in advice["tied_with"] else "beaten"
            evidence.append(f"<tr><td>{advice['shots']}</td><td>{html.escape(advice['fidelity_winner'])} − {html.escape(other)}</td><td>{_delta(comparison)}</td>"
                            f"<td>{comparison['detectable']:.4f}</td><td>{tied}</td></tr>")
    series = {t: sorted(points) for t, points in series.items()}
    if len(plan["shots"]) > 1:
        quality_plot = _svg_lines(series, x_label="shots (log)", y_label="mean KID (lower is better)", log_x=True)
    else:
        quality_plot = _svg_bars(_kid_rows(results), label="mean KID over replicates (bars: lowest to highest replicate)")

    sections = []
    for shots in plan["shots"]:
        images = load_dataset(settings["data"], resolution=32, shots=shots, seed=settings["seed"],
                              fit=settings.get("fit", "crop"), background=settings.get("background", "white"),
                              caption_extension=settings.get("caption_extension", ".txt"), caption_column=settings.get("caption_column", "text"))
        save_grid(images.pixels, out / f"shots-{shots}.png", columns=min(5, len(images)), scale=2)
        cards = [f"<figure><img src='shots-{shots}.png'><figcaption>the {shots} training shot(s)</figcaption></figure>"]
        for name, run in results["runs"].items():
            if run["technique"] == "base" or run["shots"] != shots or run.get("replicate", 0) != 0:
                continue
            folder = f"runs/{name}"
            copies = run["evaluation"].get("memorisation", {}).get("copies", [])
            copy_figure = f"<figure><img src='{folder}/eval/copies.png'><figcaption>{len(copies)} flagged copies: sample | shot</figcaption></figure>" if copies else ""
            cards.append(
                f"<div class='run'><h4>{html.escape(run['technique'])}</h4><figure><img src='{folder}/eval/samples.png'><figcaption>samples</figcaption></figure>"
                f"{copy_figure}<figure>{_loss_curve(out / folder)}<figcaption>training loss</figcaption></figure>"
                f"<figure>{_validation_curve(out / folder)}<figcaption>validation (best step kept)</figcaption></figure></div>"
            )
        sections.append(f"<h3>{shots} shot(s)</h3><div class='grid'>{''.join(cards)}</div>")

    probe_section = _lr_probe_section(results.get("lr_probe"))
    dropped = "".join(f"<li>{html.escape(d)}</li>" for d in plan["dropped"]) or "<li>none</li>"
    failed = "".join(f"<li><b>{html.escape(name)}</b> failed after its retries: {html.escape(error)}</li>" for name, error in results.get("failed", {}).items())
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
in the feature space <code>{html.escape(results['runs']['base']['evaluation']['features'])}</code>. Every run: {plan['steps']} steps; {plan.get('replicates', 1)} replicate(s) per technique and shot count.</p>
<div class='verdict'>{'<br>'.join(verdict(results))}</div>
<h2>{'Quality against shots' if len(plan['shots']) > 1 else 'Quality by technique'}</h2>{quality_plot}
<h2>Every technique</h2><table><tr><th>technique</th><th>shots</th><th>mean KID [replicates' range]</th><th>replicates</th><th>Δ KID vs base [95% CI]</th>
<th>intra-cluster diversity</th><th>copy rate</th><th>trainable params</th><th>artifact</th><th>CPU-min</th><th></th></tr>{''.join(rows)}</table>
<h2>Paired evidence</h2><table><tr><th>shots</th><th>KID difference</th><th>95% CI (paired, pooled over replicates)</th><th>smallest detectable (80% power)</th><th></th></tr>{''.join(evidence)}</table>
<p><small>KID: lower is better. Every technique of one replicate is sampled from the same seeds and scored on the same reference half-samples, so differences are paired;
a difference whose interval excludes 0 is a win. Rule: disqualified above {settings.get('copy_ceiling', 0.05):.0%} copies or below
{settings.get('diversity_floor', 0.5):g}x the lesser of the held-out target images' own diversity around the same shots and the base's{_yardsticks(results)}; lowest KID wins; ties go to the smallest artifact, then fewest CPU-minutes.
Diversity: mean pairwise cosine distance of samples assigned to the same shot (CDC protocol, in the eval encoder's space). Copy rate: see docs/evaluation.md.</small></p>
{probe_section}
{''.join(sections)}
<h2>Plan</h2><p>{plan_text}</p>
<p>Dropped runs:</p><ul>{dropped}</ul>{'<p>Failed runs (left out of the decision):</p><ul>' + failed + '</ul>' if failed else ''}</body></html>"""
    return write_text(out / "report.html", page)


def write_demo_index(results: dict[str, dict], out: Path) -> Path:
    """One page over the per-model reports: the verdicts, then links to the evidence."""
    blocks = []
    for base, result in results.items():
        lines = "<br>".join(verdict(result))
        pictures = ""
        for advice in result.get("recommendation", [])[:1]:
            if advice.get("technique") is None:
                continue
            best = f"{advice['technique']}-{advice['shots']}shot-r0"
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
