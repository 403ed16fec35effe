"""The browser's pages as Jinja2 templates (autoescaped: run data is always shown as text)."""

from __future__ import annotations

import jinja2

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}saelab{% endblock %}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
a { color: #1a5fb4; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: .5em 0 1em; } th, td { border: 1px solid #ddd; padding: 3px 7px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; background: #fafafa; padding: 2px 4px; }
.act { border-radius: 2px; } .tok { }
.correct { color: #26a269; font-weight: 600; } .incorrect { color: #c01c28; font-weight: 600; }
.failed { color: #888; } .muted { color: #777; } form.filters input { width: 6em; }
form.filters input[name=q] { width: 16em; } nav { margin-bottom: 1em; }
</style></head><body>
<nav><a href="/">runs</a>{% block nav %}{% endblock %}</nav>
{% block body %}{% endblock %}
</body></html>
"""

INDEX = """{% extends "base" %}{% block body %}
<h1>saelab feature browser</h1>
<table><tr><th>run</th><th>folder</th><th></th><th></th></tr>
{% for r in runs %}<tr><td><a href="/run/{{ r.name | urlencode }}/">{{ r.name }}</a></td>
<td class="muted">{{ r.folder }}</td><td><a href="/run/{{ r.name | urlencode }}/report">report</a></td>
<td>{% for o in runs if o.name != r.name %}<a href="/compare/{{ r.name | urlencode }}/{{ o.name | urlencode }}">vs {{ o.name }}</a> {% endfor %}</td></tr>
{% endfor %}</table>
{% endblock %}"""

LIST = """{% extends "base" %}{% block title %}{{ run.name }}: latents{% endblock %}
{% block nav %} / <a href="/run/{{ run.name | urlencode }}/">{{ run.name }}</a> /
<a href="/run/{{ run.name | urlencode }}/report">report</a>{% endblock %}
{% block body %}
<h1>{{ run.name }}: {{ result.total }} of {{ run.d_sae }} latents</h1>
<form class="filters" method="get" id="filters">
<label>explanation contains <input name="q" id="search" value="{{ query.q }}"></label>
<label>model <select name="model"><option value="">any</option>
{% for m in models %}<option{% if m == query.model %} selected{% endif %}>{{ m }}</option>{% endfor %}</select></label>
<label><input type="checkbox" name="explained" value="1"{% if query.explained %} checked{% endif %}> explained only</label><br>
<label>frequency <input name="freq_min" value="{{ query.freq_min if query.freq_min is not none else '' }}"> to
<input name="freq_max" value="{{ query.freq_max if query.freq_max is not none else '' }}"></label>
<label>max act <input name="act_min" value="{{ query.act_min if query.act_min is not none else '' }}"> to
<input name="act_max" value="{{ query.act_max if query.act_max is not none else '' }}"></label>
<label>score <select name="metric">{% for m in metrics %}<option{% if m == query.metric %} selected{% endif %}>{{ m }}</option>{% endfor %}</select></label>
<label>of <select name="score_key"><option value="">(none)</option>
{% for k in score_keys %}<option{% if k == query.score_key %} selected{% endif %}>{{ k }}</option>{% endfor %}</select>
<input name="score_min" value="{{ query.score_min if query.score_min is not none else '' }}"> to
<input name="score_max" value="{{ query.score_max if query.score_max is not none else '' }}"></label>
<input type="hidden" name="sort" value="{{ query.sort }}"><input type="hidden" name="order" value="{{ 'desc' if query.desc else 'asc' }}">
<button type="submit" id="apply">apply</button></form>
<table id="latents"><tr>
{% for key, label in columns %}<th><a class="sort" href="{{ sort_link(key) }}">{{ label }}{% if query.sort == key %} {{ '▼' if query.desc else '▲' }}{% endif %}</a></th>{% endfor %}
<th>explanations</th></tr>
{% for row in result.rows %}<tr class="latent-row">
<td><a class="latent-link" href="/run/{{ run.name | urlencode }}/latent/{{ row.latent }}">{{ row.latent }}</a></td>
<td class="num">{{ '%.2e' % row.frequency }}</td><td class="num">{{ '%.3f' % row.max_act }}</td>
{% for k in score_keys %}<td class="num score">{{ '%.3f' % row.scores[k] if row.scores[k] is not none else '' }}</td>{% endfor %}
<td>{% for e in row.explanations %}<div class="explanation"><span class="muted">{{ e.explainer }}:</span> {{ e.explanation }}</div>{% endfor %}</td>
</tr>{% endfor %}</table>
<p>page {{ query.page }} of {{ result.pages }}
{% if query.page > 1 %}<a id="prev" href="{{ page_link(query.page - 1) }}">previous</a>{% endif %}
{% if query.page < result.pages %}<a id="next" href="{{ page_link(query.page + 1) }}">next</a>{% endif %}</p>
{% endblock %}"""

TOKENS = """{% macro tokens(ex, scale) -%}
<span class="example">{% for s, a in zip(ex.token_strs, ex.acts) -%}
{% if a > 0 %}<span class="act" title="{{ '%.4g' % a }}" data-act="{{ a }}" style="background: rgba(255, 120, 0, {{ '%.3f' % (0.15 + 0.85 * [a / scale, 1.0] | min) }})">{{ s }}</span>
{%- else %}<span class="tok">{{ s }}</span>{% endif %}{%- endfor %}</span>
{%- endmacro %}"""

LATENT = """{% extends "base" %}{% from "tokens" import tokens %}
{% block title %}{{ run.name }}: latent {{ p.latent }}{% endblock %}
{% block nav %} / <a href="/run/{{ run.name | urlencode }}/">{{ run.name }}</a> / latent {{ p.latent }}{% endblock %}
{% block body %}
<h1>Latent {{ p.latent }}</h1>
<p>fires on {{ p.count }} tokens (frequency {{ '%.3e' % p.frequency }}), max activation {{ '%.4g' % p.max_act }}</p>
<h2>Explanations and scores</h2>
{% if p.explanations %}<table id="explanations"><tr><th>explainer</th><th>model</th><th>explanation</th></tr>
{% for e in p.explanations %}<tr><td>{{ e.explainer }}</td><td>{{ e.model }}</td>
<td class="explanation">{% if e.ok %}{{ e.explanation }}{% else %}<span class="failed">failed: {{ e.error }}</span>{% endif %}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">not explained</p>{% endif %}
{% if p.scores %}<table id="scores"><tr><th>explainer</th><th>scorer</th>{% for m in metric_names %}<th>{{ m }}</th>{% endfor %}</tr>
{% for s in p.scores %}<tr class="score-row"><td>{{ s.explainer }}</td><td>{{ s.scorer }}</td>
{% for m in metric_names %}<td class="num">{{ fmt(s.metrics.get(m)) }}</td>{% endfor %}</tr>{% endfor %}</table>
{% else %}<p class="muted">not scored</p>{% endif %}
<h2>Activation histogram</h2>
{% if bars %}<svg id="histogram" width="{{ hist_w }}" height="{{ hist_h + 20 }}" role="img" aria-label="activation histogram">
{% for b in bars %}<rect x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ b.h }}" fill="#e66100"><title>{{ b.title }}</title></rect>{% endfor %}
<line x1="0" y1="{{ hist_h }}" x2="{{ hist_w }}" y2="{{ hist_h }}" stroke="#333"/>
<text x="0" y="{{ hist_h + 15 }}" font-size="11">{{ '%.3g' % hist_lo }}</text>
<text x="{{ hist_w }}" y="{{ hist_h + 15 }}" font-size="11" text-anchor="end">{{ '%.3g' % hist_hi }}</text></svg>
{% else %}<p class="muted">never fires on the cached tokens</p>{% endif %}
{% if ex %}
<h2>Top examples (shown to the explainer)</h2>
<table class="examples" id="top">{% for e in ex.train %}<tr><td class="num">{{ '%.3g' % e.max_act }}</td><td>{{ tokens(e, p.max_act) }}</td></tr>{% endfor %}</table>
<h2>Scoring examples</h2>
<p class="muted">Quantile examples (activating, 0 = lowest quantile) and the non-activating examples used in scoring, with
each scorer's judgement: correct when its prediction matches the label.</p>
<table class="examples" id="scoring"><tr><th>set</th><th>max act</th><th>example</th>{% for s in p.scores %}<th>{{ s.key }}</th>{% endfor %}</tr>
{% for e, label in scoring %}<tr class="{{ 'activating' if label else 'non-activating' }}">
<td>{{ ('quantile %d' % e.quantile) if label else 'non-activating' }}</td><td class="num">{{ '%.3g' % e.max_act }}</td>
<td>{{ tokens(e, p.max_act) }}</td>
{% for s in p.scores %}{% set j = judge(s, e) %}<td class="judgement {{ j[0] }}" title="{{ j[1] }}">{{ j[0] }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% else %}<p class="muted">no examples sampled for this latent</p>{% endif %}
<h2>Nearest latents (decoder cosine similarity)</h2>
{% if p.neighbours %}<table id="neighbours"><tr><th>latent</th><th>cosine</th><th>explanation</th></tr>
{% for n, c in p.neighbours %}<tr><td><a href="/run/{{ run.name | urlencode }}/latent/{{ n }}">{{ n }}</a></td><td class="num">{{ '%.3f' % c }}</td>
<td>{% for e in explanations(n) %}<div>{{ e.explanation }}</div>{% endfor %}</td></tr>{% endfor %}</table>
{% else %}<p class="muted">no decoder weights in this run</p>{% endif %}
{% endblock %}"""

COMPARE = """{% extends "base" %}{% block title %}{{ a.name }} vs {{ b.name }}{% endblock %}
{% block nav %} / compare{% endblock %}
{% block body %}
<h1><a href="/run/{{ a.name | urlencode }}/">{{ a.name }}</a> vs <a href="/run/{{ b.name | urlencode }}/">{{ b.name }}</a></h1>
{% if not same_sae %}<p class="incorrect">The two runs' latent caches come from different SAEs: latent ids do not name
the same latents.</p>{% endif %}
<p>{{ common | length }} latents explained in both runs{% if truncated %} (first {{ rows | length }} shown){% endif %}; {{ metric }} per score.</p>
<table id="compare"><tr><th>latent</th><th>{{ a.name }}</th><th>{{ b.name }}</th>
{% for k in keys %}<th>{{ k }} {{ a.name }}</th><th>{{ k }} {{ b.name }}</th><th>Δ</th>{% endfor %}</tr>
{% for r in rows %}<tr><td><a class="pair-link" href="/compare/{{ a.name | urlencode }}/{{ b.name | urlencode }}/latent/{{ r.latent }}">{{ r.latent }}</a></td>
<td><a href="/run/{{ a.name | urlencode }}/latent/{{ r.latent }}">{% for e in r.a %}<div>{{ e.explanation }}</div>{% endfor %}</a></td>
<td><a href="/run/{{ b.name | urlencode }}/latent/{{ r.latent }}">{% for e in r.b %}<div>{{ e.explanation }}</div>{% endfor %}</a></td>
{% for k in keys %}<td class="num">{{ fmt(r.sa[k]) }}</td><td class="num">{{ fmt(r.sb[k]) }}</td><td class="num">{{ fmt(r.delta[k]) }}</td>{% endfor %}
</tr>{% endfor %}</table>
{% endblock %}"""

COMPARE_LATENT = """{% extends "base" %}{% from "tokens" import tokens %}
{% block title %}latent {{ latent }}: {{ a.name }} vs {{ b.name }}{% endblock %}
{% block nav %} / <a href="/compare/{{ a.name | urlencode }}/{{ b.name | urlencode }}">{{ a.name }} vs {{ b.name }}</a> / latent {{ latent }}{% endblock %}
{% block body %}
<h1>Latent {{ latent }}: {{ a.name }} vs {{ b.name }}</h1>
{% if not same_sae %}<p class="incorrect">The two runs' latent caches come from different SAEs: latent {{ latent }} is
not the same latent in both.</p>{% endif %}
<table id="pair"><tr>{% for run, p in sides %}<th><a href="/run/{{ run.name | urlencode }}/latent/{{ latent }}">{{ run.name }}</a></th>{% endfor %}</tr>
<tr>{% for run, p in sides %}<td style="vertical-align: top; width: 50%">
<p>fires on {{ p.count }} tokens (frequency {{ '%.3e' % p.frequency }}), max activation {{ '%.4g' % p.max_act }}</p>
{% for e in p.explanations %}<div class="explanation"><span class="muted">{{ e.explainer }} ({{ e.model }}):</span>
{% if e.ok %}{{ e.explanation }}{% else %}<span class="failed">failed: {{ e.error }}</span>{% endif %}</div>{% endfor %}
<table>{% for s in p.scores %}<tr class="score-row"><td>{{ s.key }}</td>{% for m in metric_names[:4] %}<td class="num">{{ m }} {{ fmt(s.metrics.get(m)) }}</td>{% endfor %}</tr>{% endfor %}</table>
{% if p.examples %}{% for e in p.examples.train %}<div>{{ tokens(e, p.max_act) }}</div>{% endfor %}{% endif %}
</td>{% endfor %}</tr></table>
{% endblock %}"""

ERROR = """{% extends "base" %}{% block title %}{{ heading }}{% endblock %}{% block body %}
<h1>{{ heading }}</h1><p>{{ message }}</p>
{% if items is defined %}<ul id="problems">{% for i in items %}<li>{{ i }}</li>{% endfor %}</ul>{% endif %}{% endblock %}"""


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.DictLoader(
            {
                "base": BASE,
                "index": INDEX,
                "list": LIST,
                "tokens": TOKENS,
                "latent": LATENT,
                "compare": COMPARE,
                "compare_latent": COMPARE_LATENT,
                "error": ERROR,
            }
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.globals["zip"] = zip
    return env
