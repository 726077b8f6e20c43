"""Command line: ``steamviz demo``, ``edit``, ``sweep``, ``compare``, ``figures``, ``claims``,
``pool``, ``data``, ``doctor`` (each is a thin layer over the library).

Run ``steamviz --help`` or ``python -m steamviz --help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    import torch

    from .show.demo import run_demo
    from .core.models import load_model

    _check_device(args.device)
    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device)
    run_demo(lm, args.out, n_edits=args.n, lam=args.lam, png=not args.no_png)
    return 0


def _edit(args) -> int:
    from .edit import rome
    from .core.forward import greedy, target_logprobs
    from .core.models import load_model
    from .data.requests import EditRequest

    _check_device(args.device)
    req = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target_new,
                      target_true=args.target_true)  # a bad request fails before the model
    lm = load_model(args.model, device=args.device)
    before = greedy(lm, [req.rewrite_prompt], 12)[0]
    edit = rome.apply(lm, req)
    after = greedy(lm, [req.rewrite_prompt], 12)[0]
    p = target_logprobs(lm, [req.rewrite_prompt], [req.target_new])[0]["prob"]
    print(f"before: {req.rewrite_prompt}{before}\nafter:  {req.rewrite_prompt}{after}\n"
          f"P({req.target_new!r}) = {p:.3f}")
    if args.save:
        print("saved delta to", edit.save(args.save))
    return 0


def _params(items: list[str]) -> dict:
    """``KEY=VALUE`` strings (values read as YAML: numbers, null, lists) to a dict."""
    import yaml

    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--param {item!r}: expected KEY=VALUE, e.g. --param "
                             "v_num_grad_steps=10")
        out[key.strip()] = yaml.safe_load(val)
    return out


class UsageError(ValueError):
    """A command-line value that cannot work: printed as one line, exit code 2."""


def _check_device(device: str) -> None:
    import torch

    if device not in ("auto", "cpu", "mps") and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch build ({torch.__version__}) sees no "
                         "CUDA device; use --device cpu (or auto), or install a CUDA build")


def _check_recall(rule: str) -> None:
    from .look.anchors import recall_rule_ok

    why = recall_rule_ok(rule)
    if why:
        raise UsageError(f"--recall: {why}")


def _check_edit_args(method: str, lam, params: dict, model=None) -> dict:
    """Everything about the editor that can be checked before the model loads (block
    indices against the depth in ``model``'s config)."""
    from .edit.editors import check_params, methods, spec
    from .core.models import model_depth

    known = methods(batch=False)
    if method.lower() not in known:
        raise UsageError(f"--method {method!r}: unknown; choose one of {known}")
    if lam is not None:
        if "lam" not in spec(method).axes:
            with_lam = [m for m in methods() if "lam" in spec(m).axes]
            raise UsageError(f"--lam is STEAM's alignment strength; --method {method} has none "
                             f"(methods with one: {', '.join(with_lam)})")
        if lam < 0:
            raise UsageError(f"--lam {lam:g}: must be >= 0")
        params = dict(params, lam=lam)
    why = check_params(method, params, model_depth(model))
    if why:
        raise UsageError(f"--param: {why}")
    return params


def _eval(args) -> int:
    from .run import evaluation
    from .data.datasets import load_named
    from .core.io import write_bytes, write_text
    from .core.models import load_model

    if args.n is not None and args.n < 1:
        raise UsageError(f"--n {args.n}: evaluate at least one request (--n 1 or more)")
    _check_device(args.device)
    params = {} if args.block is None else {"block": args.block}
    params.update(_params(args.param))
    params = _check_edit_args(args.method, args.lam, params, args.model)
    reqs = load_named(args.data, args.n)  # a bad data name or file fails before the model
    lm = load_model(args.model, device=args.device)
    df = evaluation.run(lm, reqs, method=args.method, generation=not args.no_generation,
                        **params)
    table = evaluation.summarize(df)
    print(evaluation.markdown(table))
    if args.out:
        out = Path(args.out)
        write_bytes(out / "results.csv", df.to_csv(index=False).encode())
        write_text(out / "summary.md", evaluation.markdown(table) + "\n")
        print(f"wrote {out}/results.csv")
    return 0


def _sweep(args) -> int:
    from .run.sweep import ConfigError, SweepConfig, run_sweep, summarize

    try:
        cfg = SweepConfig.from_yaml(args.config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"steamviz sweep: bad config: {e}", file=sys.stderr)
        return 2
    if args.n is not None:
        cfg.n_edits = args.n
    from .run.executors import ExecutorError

    from .run.sweep import StoreBusy

    try:
        df = run_sweep(cfg, args.out, executor=args.executor, address=args.address,
                       workers=args.workers, force=args.force)
    except (ExecutorError, ConfigError, StoreBusy) as e:
        print(f"steamviz sweep: {e}", file=sys.stderr)
        return 2
    from .run.evaluation import markdown

    table = summarize(df)
    print(markdown(table.set_index("method")))
    return 0


def _figures(args) -> int:
    from .show import figures
    from .run.sweep import Store

    run = Path(args.run)
    df = Store(run).frame()
    if df.empty:
        print(f"steamviz figures: no results in {run}/points", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run / "figures"
    made = figures.sweep_figures(df, log=lambda m: print(f"steamviz figures: {m}"))
    if args.replay:
        from .show.replay import replay_figures

        made.update(replay_figures(run, map_method=args.map, device=args.device,
                                   log=lambda m: print(f"steamviz figures: {m}")))
    formats = tuple(args.formats.split(","))
    for name, fig in made.items():
        paths = figures.export(fig, out / name, formats=formats, size=args.size,
                               scale=args.scale)
        print("wrote", ", ".join(str(p) for p in paths))
    return 0


def _data(args) -> int:
    from .data import fetch

    if args.action == "list":
        rows = fetch.table()
        w = max(len(r["name"]) for r in rows)
        print(f"{'name':<{w}}  {'files':>5}  {'MB':>6}  {'status':<11}  description")
        for r in rows:
            only = f" [{r['mirror_only']} file(s) only in the data mirror]" if r["mirror_only"] else ""
            print(f"{r['name']:<{w}}  {r['files']:>5}  {r['mb']:>6.2f}  {r['status']:<11}  "
                  f"{r['description']}{only}")
        m = fetch.mirror()
        print(f"\ncache: {fetch.data_root()}\nmirror (${fetch.MIRROR_ENV}): "
              f"{m or 'not set'}")
        return 0
    names = args.names or []
    if names == ["all"]:
        names = list(fetch.sources())
    if not names:
        print("steamviz data get: name one or more data sets (or 'all'); see `steamviz data "
              "list`", file=sys.stderr)
        return 2
    try:
        for name in names:
            root = fetch.get(name, log=print)
            print(f"{name}: ready in {root}")
    except fetch.DataError as e:
        print(f"steamviz data get: {e}", file=sys.stderr)
        return 2
    return 0


def _pool(args) -> int:
    from .look import pool
    from .data.datasets import load_named
    from .core.io import write_json
    from .core.models import load_model

    _check_recall(args.recall)
    reqs = load_named(args.data, args.n)  # data errors come before the model loads
    facts = pool.load_pool(extra=args.facts)  # a bad facts file before the model loads
    lm = load_model(args.model, device=args.device)
    t0 = time.time()
    if args.patterns == "best":  # ParaRel facts again, each relation in its chosen pattern
        templates = pool.best_templates(lm, {r.subject for r in reqs}, args.recall, log=print)
        facts = pool.load_pool(extra=args.facts, pararel_templates=templates)
    print(f"[pool] {len(facts):,} candidate facts, {len({f.object for f in facts}):,} objects, "
          f"{len({f.relation for f in facts})} relations")
    rep = pool.coverage(lm, reqs, facts, min_facts=args.min_facts, widen_to=args.widen,
                        rule=args.recall, log=print)
    reasons = {r["reason"] for r in rep["rows"] if r["reason"]}
    print(f"[pool] {rep['recalled']:,} of {rep['candidates']:,} candidates recalled "
          f"({time.time() - t0:.0f} s)")
    print(f"coverage: {rep['anchored']} of {rep['requests']} requests ({rep['share']:.1%}) get "
          f"an anchor of >= {args.min_facts} recalled facts; {rep['single_relation']} of those "
          "rest on a single relation")
    missing = [r for r in rep["rows"] if not r["anchored"]]
    if missing:
        print(f"without an anchor ({len(missing)}), by reason:")
        for why, n in sorted(((w, sum(r["reason"] == w for r in missing)) for w in reasons),
                             key=lambda x: -x[1])[:10]:
            print(f"  {n:4d}  {why}")
    if args.out:
        write_json(args.out, rep)
        print("wrote", args.out)
    return 0


def _compare(args) -> int:
    from .measure.compare import paired
    from .run.evaluation import markdown
    from .run.sweep import Store

    df = Store(Path(args.run)).frame()
    if df.empty:
        print(f"steamviz compare: no results in {args.run}/points", file=sys.stderr)
        return 2
    if args.baseline not in set(df.method):
        print(f"steamviz compare: no {args.baseline!r} rows in {args.run} (methods: "
              f"{sorted(set(df.method))}); pass --baseline", file=sys.stderr)
        return 2
    try:
        t = paired(df, args.metrics.split(","), baseline=args.baseline)
    except ValueError as e:
        print(f"steamviz compare: {e}", file=sys.stderr)
        return 2
    print(f"Paired differences (point - {args.baseline}) per edit, bootstrap 95% CI, "
          "two-sided sign-flip p; integration metrics are held out (paraphrase prompts).\n")
    if args.table:
        from .measure.compare import table

        print("Bold: the CI excludes 0 and p < 0.05.\n")
        print(table(t))
    else:
        print(markdown(t.round(4).set_index("metric")))
    return 0


def _doctor(args) -> int:
    from .doctor import doctor_checks

    rows = doctor_checks()
    w = max(len(r[0]) for r in rows)
    for what, ok, found, fix in rows:
        print(f"{'ok ' if ok else 'NO '} {what:<{w}}  {found}" + (f"\n    fix: {fix}" if fix else ""))
    bad = [r for r in rows if not r[1] and not r[0].startswith("data: ")]
    print(f"\nsteamviz {_version()}: " + ("ready" if not bad else f"{len(bad)} problem(s)"))
    return 0 if not bad else 1


def _claims(args) -> int:
    from .run.claims import ClaimsConfig, report_so_far, run_claims
    from .core.models import load_model

    if args.so_far:
        try:
            report_so_far(args.out)
        except FileNotFoundError as e:
            print(f"steamviz claims: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}/claims-so-far.md")
        return 0

    cfg = ClaimsConfig(n_cf=args.n_cf, n_port=args.n_port, seeds=args.seeds,
                       lams=args.lams, centred_lam=args.centred_lam,
                       hparams=_params(args.param), candidates=args.candidates,
                       port_candidates=args.port_candidates, portability=args.portability,
                       recall_rule=args.recall, pararel_patterns=args.patterns)
    if args.tune_lams:
        cfg.tune_lams = args.tune_lams
    if args.n_tune:
        cfg.n_tune = args.n_tune
    _check_recall(args.recall)
    from .run.executors import ExecutorError

    try:
        run_claims(cfg, args.out, lm=load_model(args.model, device=args.device),
                   executor=args.executor, address=args.address, workers=args.workers)
    except ExecutorError as e:
        print(f"steamviz claims: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/claims.md")
    return 0


def _executor_args(p) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where points run: this process, or a Ray cluster (pip install 'steamviz[ray]')")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto', HOST:PORT or ray://HOST:10001 (default: a local Ray instance)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers, each holding the model (default: one per GPU, else per CPU)")


def _version() -> str:
    from . import __version__

    return __version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="steamviz", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"steamviz {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("data", help="public data sets: list them, fetch them into the cache")
    g.add_argument("action", choices=["list", "get"])
    g.add_argument("names", nargs="*", help="data sets to fetch (get), or 'all'")
    g.set_defaults(fn=_data)
    o = sub.add_parser("pool", help="the reference-fact pool: coverage of a request set's "
                                    "new objects by anchors")
    o.add_argument("--data", default="counterfact",
                   help="'counterfact' (val set), 'default' or a requests file")
    o.add_argument("--n", type=int, default=None, help="first N requests (default: all)")
    o.add_argument("--facts", default=None, help="your own facts file (JSON lines) to add")
    o.add_argument("--min-facts", type=int, default=3)
    o.add_argument("--recall", default="greedy",
                   help="recall rule: greedy (the model generates the object) or topK (its "
                        "first token among the K likeliest), e.g. top3")
    o.add_argument("--widen", type=int, default=400,
                   help="second pass: up to N candidates per relation for objects short of "
                        "--min-facts recalled facts (0: off)")
    o.add_argument("--patterns", choices=["best", "first"], default="best",
                   help="ParaRel pattern per relation: the one the model completes best on "
                        "subjects not evaluated (best), or the file's first (first)")
    o.add_argument("--out", default=None, help="write the per-request report (JSON)")
    o.add_argument("--model", default=None)
    o.add_argument("--device", default="auto")
    o.set_defaults(fn=_pool)
    d = sub.add_parser("demo", help="edit 4 default facts with ROME and STEAM-ROME; write "
                                    "report.html (completions, layer cosine, latent map, "
                                    "logit lens)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=4, help="edits of the default set")
    d.add_argument("--lam", type=float, default=None, help="STEAM's alignment strength")
    d.add_argument("--no-png", action="store_true", help="skip the PNG export")
    d.add_argument("--model", default=None, help="default: SmolLM2-135M (offline)")
    d.add_argument("--device", default="auto")
    d.set_defaults(fn=_demo)
    e = sub.add_parser("edit", help="edit one fact with ROME and show before/after")
    e.add_argument("--prompt", required=True, help='template with {} for the subject')
    e.add_argument("--subject", required=True)
    e.add_argument("--target-new", required=True)
    e.add_argument("--target-true", default=None)
    e.add_argument("--save", default=None, help="write the weight delta (safetensors)")
    e.add_argument("--model", default=None)
    e.add_argument("--device", default="auto")
    e.set_defaults(fn=_edit)
    v = sub.add_parser("eval", help="edit many requests one at a time; metrics before/after")
    v.add_argument("--data", default="counterfact",
                   help="'counterfact' (shared val set), 'default' (data/edits.jsonl) or a file")
    v.add_argument("--n", type=int, default=100)
    v.add_argument("--method", default="rome")
    v.add_argument("--lam", type=float, default=None, help="STEAM alignment strength")
    v.add_argument("--block", "--layer", type=int, help="edited block index (--layer: its old name)")
    v.add_argument("--no-generation", action="store_true", help="skip fluency/consistency")
    v.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an editor parameter (e.g. a hyperparameter field: "
                        "v_matmul_dtype=bfloat16); repeatable")
    v.add_argument("--out", default=None)
    v.add_argument("--model", default=None)
    v.add_argument("--device", default="auto")
    v.set_defaults(fn=_eval)
    w = sub.add_parser("sweep", help="run a sweep from a YAML config (resumable)")
    w.add_argument("config")
    w.add_argument("--out", required=True, help="run folder, e.g. runs/lam")
    w.add_argument("--n", type=int, default=None, help="override n_edits")
    w.add_argument("--force", action="store_true",
                   help="add this config's points to a run folder made with another config")
    _executor_args(w)
    w.set_defaults(fn=_sweep)
    f = sub.add_parser("figures", help="write the figures of a sweep run folder")
    f.add_argument("run")
    f.add_argument("--formats", default="html,png,pdf,svg")
    f.add_argument("--out", default=None, help="folder for the figures (default: RUN/figures)")
    f.add_argument("--size", choices=["two_column", "one_column"], default="two_column",
                   help="paper width of PNG/PDF/SVG (HTML stays responsive)")
    f.add_argument("--scale", type=float, default=2.0, help="PNG pixels per layout pixel")
    f.add_argument("--replay", action="store_true",
                   help="also the figures that need the model: re-apply the run's ROME and "
                        "STEAM edits (same config, same references) and draw the latent map "
                        "of each edit and the logit lens (minutes on a CPU)")
    f.add_argument("--map", choices=["pca", "umap"], default="pca",
                   help="with --replay: the latent map's projection")
    f.add_argument("--device", default=None, help="with --replay: the model's device "
                   "(default: the run's)")
    f.set_defaults(fn=_figures)
    q = sub.add_parser("claims", help="STEAM's claims on public data: paired effects, CIs, "
                                      "verdicts (resumable)")
    q.add_argument("--out", required=True, help="run folder, e.g. runs/claims")
    q.add_argument("--so-far", action="store_true",
                   help="only write the table of the requests finished so far "
                        "(RUN/claims-so-far.md; runs nothing, loads no model)")
    q.add_argument("--n-cf", type=int, default=200, help="CounterFact val cases with anchors")
    q.add_argument("--n-port", type=int, default=100, help="portability cases with anchors")
    q.add_argument("--candidates", type=int, default=400, help="CounterFact cases screened")
    q.add_argument("--port-candidates", type=int, default=None,
                   help="portability cases screened (default: all of MQuAKE's single edits and zsRE)")
    q.add_argument("--portability", choices=["mirror", "full"], default="mirror",
                   help="MQuAKE and zsRE: the data mirror's fixed halves (mirror) or the whole "
                        "public files (full: steamviz data get mquake-full zsre-full)")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="anchor seeds")
    q.add_argument("--lams", type=float, nargs="+", default=[20.0, 50.0],
                   help="raw-loss lambdas")
    q.add_argument("--centred-lam", type=float, default=None,
                   help="centred-loss lambda (default: tuned on the default edit set)")
    q.add_argument("--tune-lams", type=float, nargs="+", default=None,
                   help="centred-loss lambdas tried when tuning (default: 5 10 20 50 100 200;"
                        " RUN/tuning.json keeps the grid it was tuned on, another one tunes again)")
    q.add_argument("--n-tune", type=int, default=None,
                   help="edits of the default edit set the tuning runs on (default: 20)")
    q.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a ROME hyperparameter override; repeatable")
    q.add_argument("--recall", default="greedy", help="recall rule of reference facts: "
                   "greedy or topK (see steamviz pool --recall)")
    q.add_argument("--patterns", choices=["best", "first"], default="best",
                   help="ParaRel pattern per relation (see steamviz pool --patterns)")
    q.add_argument("--model", default=None)
    q.add_argument("--device", default="auto")
    _executor_args(q)
    q.set_defaults(fn=_claims)
    k = sub.add_parser("doctor", help="check the model, data, export browser, torch, versions")
    k.set_defaults(fn=_doctor)
    c = sub.add_parser("compare", help="paired differences vs a baseline method, with 95%% CIs")
    c.add_argument("run")
    c.add_argument("--baseline", default="rome")
    c.add_argument("--metrics", default="efficacy,paraphrase,neighborhood,portability,"
                   "cos_centered,cos_centered_control,cos_centered_trained,knn_share,axis,steps")
    c.add_argument("--table", action="store_true",
                   help="one row per metric, one column per method: the table of docs/results.md")
    c.set_defaults(fn=_compare)
    args = ap.parse_args(argv)
    from .data.fetch import DataError
    from .data.requests import RequestError

    try:
        return args.fn(args)
    except (DataError, RequestError, UsageError, FileNotFoundError) as e:
        print(f"steamviz {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
