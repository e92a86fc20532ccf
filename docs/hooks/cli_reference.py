"""The command-line reference, generated from the command's own argparse parsers at build
time (an MkDocs hook), so that no option is copied by hand and none is left out.

`docs/cli.md` places each command's reference with a marker line, `<!-- cli: generate -->`
or `<!-- cli: bench analyze -->`; the build fails (strict or not) if a command of the
parser has no marker or a marker names no command. `python docs/hooks/cli_reference.py`
prints the whole reference.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

MARKER = re.compile(r"^<!-- cli: ([a-z ]+) -->$", re.MULTILINE)
USAGE_WIDTH = 88


def build_parser() -> argparse.ArgumentParser:
    from jaxfusion.cli import build_parser

    return build_parser()


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """(words after `jaxfusion`, one-line help, parser) of every command that takes options:
    `("generate",)`, ..., `("bench", "analyze")`, in the parser's order."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            words = (*prefix, name)
            if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                yield from commands(sub, words)
            else:
                yield words, helps.get(name) or "", sub


def _cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _value(action: argparse.Action) -> str:
    """What the option takes: its choices, else its metavar or destination."""
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        one = " \\| ".join(f"`{c}`" for c in action.choices)
    elif isinstance(action.metavar, tuple):
        return " ".join(f"`{m}`" for m in action.metavar)
    else:
        name = action.metavar or action.dest.upper()
        one = f"`{name}`"
    if action.nargs in ("+", "*"):
        return f"{one}, one or more" if action.nargs == "+" else f"{one}, any number"
    if isinstance(action.nargs, int) and action.nargs > 1:
        return f"{action.nargs} x {one}"
    return one


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    if default is None or default is False or default == argparse.SUPPRESS or default == []:
        return ""
    if isinstance(default, list | tuple):
        return " ".join(f"`{d}`" for d in default)
    return f"`{default}`"


def _anchor(words: tuple[str, ...], action: argparse.Action) -> str:
    option = action.option_strings[0] if action.option_strings else action.dest
    return "-".join(words) + "-" + option.lstrip("-")


def command_reference(words: tuple[str, ...], summary: str, parser) -> str:
    """One command's reference: its usage line, then a table per argument group."""
    formatter = parser._get_formatter()
    formatter._width = USAGE_WIDTH
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    usage = formatter.format_help().strip()
    lines = [f"### `jaxfusion {' '.join(words)}`", "", summary[:1].upper() + summary[1:] + ".", ""]
    lines += ["```text", usage, "```", ""]
    exclusive = {
        id(action): group
        for group in parser._mutually_exclusive_groups
        for action in group._group_actions
    }
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"options": "Options", "positional arguments": "Arguments"}.get(
            group.title, group.title[:1].upper() + group.title[1:]
        )
        lines += [f"**{title}**", "", "| option | takes | default | meaning |", "|---|---|---|---|"]
        for action in actions:
            names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest}`"
            meaning = formatter._expand_help(action) if action.help else ""
            if id(action) in exclusive:
                others = [
                    a.option_strings[0]
                    for a in exclusive[id(action)]._group_actions
                    if a is not action
                ]
                required = "; one of them is required" if exclusive[id(action)].required else ""
                meaning += f" (not with {', '.join(others)}{required})"
            anchor = f'<span id="{_anchor(words, action)}"></span>'
            lines.append(
                f"| {anchor}{names} | {_value(action)} | {_cell(_default(action))} | "
                f"{_cell(meaning.strip())} |"
            )
        lines.append("")
    return "\n".join(lines)


def reference(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """ "generate" / "bench analyze" ... -> that command's reference in Markdown."""
    parser = parser or build_parser()
    return {" ".join(words): command_reference(words, s, p) for words, s, p in commands(parser)}


def fill(markdown: str, references: dict[str, str]) -> str:
    """`markdown` with every marker replaced by its command's reference; every command must
    have exactly one marker."""
    named = MARKER.findall(markdown)
    unknown = sorted(set(named) - set(references))
    missing = sorted(set(references) - set(named))
    repeated = sorted({name for name in named if named.count(name) > 1})
    if unknown or missing or repeated:
        raise ValueError(
            f"the CLI reference's markers: unknown {unknown}, missing {missing}, "
            f"repeated {repeated} (commands: {sorted(references)})"
        )
    return MARKER.sub(lambda match: references[match.group(1)], markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """The MkDocs hook: fills the page that holds markers."""
    if not MARKER.search(markdown):
        return markdown
    from mkdocs.exceptions import PluginError

    try:
        return fill(markdown, reference())
    except ValueError as error:
        raise PluginError(f"{page.file.src_uri}: {error}") from None


if __name__ == "__main__":
    print("\n\n".join(reference().values()))
