"""Printing bench.abuse's results: one JSON line per result and a compact table at the end."""

from __future__ import annotations

import json


# ----------------------------------------------------------------------------------------- output and main


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def _victims_text(victims: dict) -> str:
    return " | ".join(f"{kind} {v['calls']} calls {v['failures']} fail"
                      + (f" ({', '.join(f'{k} {n}' for k, n in v['failure_kinds'].items())})" if v["failures"] else "")
                      + f" p50 {v['p50_ms']} p99 {v['p99_ms']} max {v['max_ms']} ms" for kind, v in victims.items())


def _stop_text(stop: dict) -> str:
    return f"exit {stop.get('exit')}" + (" (died during the run)" if stop.get("died_before_stop") else "")


def format_table(results: list[dict], label: str) -> str:
    lines = [f"== bench.abuse [{label}]"]
    for r in results:
        s = r["scenario"]
        if s in ("connections", "grpc-connections", "trickle"):
            lines.append(f"{s}: attack opened in {r.get('attack_open_s')} s; took {r['seconds']} s; "
                         + _stop_text(r["stop"]))
            for kind, a in r.get("attack", {}).items():
                failed = sum(a["failed_to_open"].values())
                extra = f", reconnects {a['reconnects']}" if "reconnects" in a else ""
                lines.append(f"  {kind:9s} opened {a['opened']}/{a['connections']} (failed {failed}"
                             f"{': ' + str(a['failed_to_open']) if failed else ''}), closed by server "
                             f"{a['closed_by_server']} {a['closed_how'] or ''} after median {a['close_s_median']} "
                             f"max {a['close_s_max']} s{extra}; received {a['received'] or '-'}")
            if "victims" in r:
                lines.append("  victims: " + _victims_text(r["victims"]))
            log, before, end = r.get("server_log", {}), r.get("server_before", {}), r.get("server_end") or {}
            lines.append(f"  server log {log.get('lines')} lines {log.get('bytes')} B; RSS {before.get('rss_mb')} → "
                         f"{end.get('rss_mb')} MB, threads {before.get('threads')} → {end.get('threads')}")
        elif s == "bodies":
            a, idle, peak, after = r.get("attack", {}), r.get("server_idle", {}), r.get("server_max", {}), \
                r.get("server_after") or {}
            lines.append(f"bodies {r['format']}: {r.get('body_bytes')} B ({r.get('shape')}); attacker "
                         f"{a.get('requests')} answers {a.get('statuses')} median {a.get('seconds_median')} s "
                         f"max {a.get('seconds_max')} s, unfinished {a.get('unfinished_after_grace')}; RSS idle "
                         f"{idle.get('rss_mb')} max {peak.get('rss_mb')} after {after.get('rss_mb')} MB; "
                         f"log {r.get('server_log', {}).get('lines')} lines; {_stop_text(r['stop'])}; "
                         f"took {r['seconds']} s")
            if "victims" in r:
                lines.append("  victims: " + _victims_text(r["victims"]))
        elif s == "drain":
            t = r.get("totals", {})
            lines.append(f"drain: 200 {t.get('ok', 0)}, 503 {t.get('refused_503', 0)}, lost {t.get('lost', 0)} "
                         f"{r.get('lost_errors') or ''}, gone {t.get('server_gone', 0)}; after SIGTERM "
                         f"{r.get('after_sigterm_s')}; drained {r.get('drained')}; {_stop_text(r['stop'])}, "
                         f"SIGTERM→exit {r.get('sigterm_to_exit_s')} s; took {r['seconds']} s")
    return "\n".join(lines)


