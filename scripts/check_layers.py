#!/usr/bin/env python3
"""Fail when a module imports from a layer above its own.

The layers are the ones docs/architecture.md documents (section "Layers"):
each module of ``mailappliance`` belongs to the first layer whose patterns
match its dotted name, and may import only from its own layer or lower ones.
Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and
are skipped.  Run by the README's test command (scripts/test).
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mailappliance"

# Bottom to top.  A module is in the first layer that matches it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("values", ("mailappliance", "mailappliance.directory", "mailappliance.verdicts", "mailappliance.blocking", "mailappliance.addresses", "mailappliance.mailpath", "mailappliance.sasl",
                "mailappliance.sessions", "mailappliance.tls_records", "mailappliance.metrics", "mailappliance.trace_headers",
                "mailappliance.dsn_params", "mailappliance.errors")),
    ("settings", ("mailappliance.settings", "mailappliance.worker_settings", "mailappliance.screening_lists", "mailappliance.address_settings",
                  "mailappliance.msgauth.settings")),
    ("config", ("mailappliance.config",)),
    ("policy", ("mailappliance.policy", "mailappliance.screening", "mailappliance.addressing", "mailappliance.srs",
                "mailappliance.address_settings", "mailappliance.budget", "mailappliance.folders",
                "mailappliance.queue.schedule", "mailappliance.queue.dsn", "mailappliance.queue.notices",
                "mailappliance.queue.routing", "mailappliance.msgauth", "mailappliance.msgauth.*",
                "mailappliance.filter", "mailappliance.filter.*", "mailappliance.state", "mailappliance.state.*",
                "mailappliance.limits", "mailappliance.throttle")),
    ("storage", ("mailappliance.directory", "mailappliance.directory.*", "mailappliance.maildir",
                 "mailappliance.delivered_to", "mailappliance.queue.spool", "mailappliance.delivery",
                 "mailappliance.committer", "mailappliance.journal", "mailappliance.journal_files", "mailappliance.pop3.index", "mailappliance.quota", "mailappliance.tls", "mailappliance.certificates",
                 "mailappliance.logs")),
    ("services", ("mailappliance.credentials", "mailappliance.authenticator", "mailappliance.client_lookup",
                  "mailappliance.queue", "mailappliance.queue.*", "mailappliance.pop3.mailbox",
                  "mailappliance.web_limits", "mailappliance.web", "mailappliance.linesession")),
    ("protocols", ("mailappliance.smtp", "mailappliance.smtp.*", "mailappliance.pop3", "mailappliance.pop3.*")),
    ("wiring", ("mailappliance.service", "mailappliance.reload", "mailappliance.msgauth.wiring", "mailappliance.tap", "mailappliance.admin",
                "mailappliance.admin_ops", "mailappliance.dkim_admin", "mailappliance.directory_setup",
                "mailappliance.backup", "mailappliance.restore", "mailappliance.*")),
]


def layer_of(module: str) -> int:
    """A module named exactly in a layer is there; otherwise the first layer whose pattern matches."""
    for index, (_, patterns) in enumerate(LAYERS):
        if module in patterns:
            return index
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    raise SystemExit(f"check_layers: {module} is in no layer")


def module_names() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_blocks(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "mailappliance":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mailappliance"]
    return found


def main() -> int:
    known = module_names()
    problems = []
    for module, path in sorted(known.items()):
        own = layer_of(module)
        for line, target in imports_of(path, known):
            if target == module or target not in known:
                continue
            if layer_of(target) > own:
                problems.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} ({LAYERS[own][0]}) imports "
                                f"{target} ({LAYERS[layer_of(target)][0]})")
    for problem in problems:
        print(problem)
    print(f"check_layers: {len(known)} modules, {len(problems)} imports from a higher layer")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
