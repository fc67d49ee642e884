"""Library code lines, as issue 18 counts them: lines holding code, without docstrings,
comments or blank lines (a statement over several lines counts each of its lines).

    python bench/code_lines.py headernet_core tuning
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}


def docstring_lines(tree: ast.Module) -> set[int]:
    """The lines of every module, class and function docstring."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstring_lines(ast.parse(source)))


def main(folders: list[str]) -> None:
    total = 0
    for folder in folders:
        count = sum(code_lines(path.read_text()) for path in sorted(Path(folder).rglob("*.py")))
        print(f"{folder}: {count}")
        total += count
    print(f"total: {total}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["headernet_core", "tuning"])
