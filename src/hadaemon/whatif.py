"""What if: --simulate (docs/operating.md): the section and the commands a transition would run.

Owns the parsing of ``HOST FROM TO`` and ``HOST=STATE`` words, the simulation
against the current states (from the daemon or its state db), and its rendering.
It runs nothing.

Uses: base, config, children.
"""

import os
import shlex

from .base import format_duration, valid_name, valid_state
from .config import section_name
from .children import plan_run


# --simulate answers with the functions the daemon itself uses (the precedence of
# Config.precedence, plan_run) over states it only reads: the running daemon's,
# asked with the status verb (which logs nothing and writes nothing), else the
# state db's (Store.read, which never opens it for writing).  It runs nothing,
# writes nothing and logs nothing, so it is safe on a live pair at any time.

def parse_what_if(host, transition, sets):
    """--simulate's words -> (host, from, to, {host: state} of every --set).

    ValueError names the bad value: a host or state name a check may not report,
    a transition that is not FROM_to_TO, a --set without ``=``.
    """
    if not valid_name(host):
        raise ValueError("bad host name %r (letters, digits, _ . : -, a letter or digit first)"
                         % host)
    parts = transition.split("_to_")
    if len(parts) != 2 or not all(parts):
        raise ValueError("%r is not FROM_to_TO (slave_to_master, say)" % transition)
    for part in parts:
        if not valid_state(part):
            raise ValueError("bad state %r in %r" % (part, transition))
    overrides = {}
    for item in sets:
        name, eq, state = item.partition("=")
        name, state = name.strip(), state.strip()
        if not eq:
            raise ValueError("--set %r: write HOST=STATE" % item)
        if not valid_name(name):
            raise ValueError("--set %r: bad host name %r" % (item, name))
        if not valid_state(state):
            raise ValueError("--set %r: bad state %r" % (item, state))
        overrides[name] = state.lower()
    return host, parts[0].lower(), parts[1].lower(), overrides


def simulate(config, state_dir, host, from_state, to_state, states, sets=None, **context):
    """What the daemon would do if HOST had just gone FROM -> TO: the --simulate --json document.

    ``states`` are the known hosts' states; every --set in ``sets`` is applied on
    top, then HOST is put in TO, as a transition leaves it.  ``context`` goes into
    the document as it is (source, pid, paused).  ``would_run`` is False when no
    section matches or a variable would be empty (``error`` says which).
    """
    sets = dict(sets or {})
    after = dict(states, **sets)
    after[host] = to_state
    section, tried = None, []
    for key in config.precedence(host, from_state, to_state):
        tried.append(section_name(*key))
        section = config.sections.get(key)
        if section is not None:
            break
    doc = {"host": host, "from": from_state, "to": to_state,
           "transition": "%s_to_%s" % (from_state, to_state)}
    doc.update(context)
    doc.update(states=dict(sorted(after.items())), set=sets, tried=tried, section=None,
               commands=[], expanded=False, variables={}, env={}, would_run=False, error=None)
    if section is None:
        doc["error"] = "no section matches %s %s_to_%s in %s" % (
            host, from_state, to_state, os.path.join(config.config_dir, "actions.conf"))
        return doc
    plan = plan_run(section, host, from_state, to_state, after, config.config_dir, state_dir)
    doc.update(section={"name": section.name, "where": section.where, "timeout": section.timeout},
               variables=plan.variables, env=plan.env, would_run=plan.error is None,
               error=plan.error, expanded=plan.error is None)
    if plan.error:      # as written: the one that cannot be expanded is named by the error
        doc["commands"] = [{"argv": list(c.argv), "ignore": c.ignore, "where": c.where}
                           for c in section.commands]
    else:
        doc["commands"] = [{"argv": c["argv"], "ignore": c["ignore"], "where": c["where"]}
                           for c in plan.commands]
    return doc


def _wrap(head, items, indent="  "):
    """HEAD then ITEMS in lines of at most 78 columns, the next lines indented; an item
    (a path, ``[db1: any_to_any]``) is never split."""
    lines, line = [], head
    for item in items:
        if line.strip() and len(line) + 1 + len(item) > 78:
            lines.append(line)
            line = indent + item
        else:
            line += (" " if line.strip() else "") + item
    return lines + [line]


def render_simulation(doc):
    """The --simulate document for a person."""
    out = ["%s: %s -> %s, as if it had just happened (nothing is run or changed)"
           % (doc["host"], doc["from"], doc["to"])]
    source = {"daemon": "the running daemon (pid %s)" % doc.get("pid"),
              "db": "the state db (no daemon running)",
              "none": "nowhere yet (no state db): every other host unknown"}[doc["source"]]
    sets = " ".join("%s=%s" % kv for kv in sorted(doc["set"].items()))
    out.append("states: from %s%s" % (source, "; --set " + sets if sets else ""))
    out += _wrap("  ", ["%s=%s" % kv for kv in doc["states"].items()])
    if doc.get("paused"):
        out += _wrap("ACTIONS ARE PAUSED:", "this sequence would be recorded as skipped (paused) "
                     "and not run, until hadaemon --resume".split())
    section = doc["section"]
    if section is None:
        out.append("no section matches; tried, in the order of precedence:")
        out += _wrap("  ", ["[%s]" % name for name in doc["tried"]])
        out += _wrap("would run nothing:", doc["error"].split())
        return "\n".join(out)
    passed = doc["tried"][:-1]
    out.append("section [%s] at %s%s" % (section["name"], section["where"],
                                         ", timeout %s per command" % format_duration(section["timeout"])))
    if passed:
        out += _wrap("  before it, not in the config:", ["[%s]" % n for n in passed], "    ")
    out.append("commands%s, in order (- = its failure is ignored):"
               % ("" if doc.get("expanded") else " as written"))
    for i, cmd in enumerate(doc["commands"], 1):
        out.append("%3d %s %s" % (i, "-" if cmd["ignore"] else " ", shlex.join(cmd["argv"])))
    if not doc["commands"]:
        out.append("    none: the run would end ok at once")
    out += _wrap("variables:", ["%%%s%%=%s" % (k, shlex.quote(v)) for k, v in doc["variables"].items()])
    out += _wrap("environment:", ["%s=%s" % (k, shlex.quote(v)) for k, v in doc["env"].items()]
                 + ["HA_RUN_ID=(the new run's id)"])
    if doc["would_run"]:
        out.append("would run: %d command%s" % (len(doc["commands"]), "s" * (len(doc["commands"]) != 1)))
    else:
        out += _wrap("would NOT run:", ("%s; the run would be recorded as failed" % doc["error"]).split())
    return "\n".join(out)
