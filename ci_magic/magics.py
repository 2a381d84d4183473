"""The IPython magics: parse arguments, look up variables, delegate to ``CodeInterpreter``, show
what it returns (through ``render/reports.py``)."""

from __future__ import annotations

import dis
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ci_magic.errors import CIError, ConfigurationError, VariableError
from ci_magic.interpreter import CodeInterpreter
from ci_magic.render import reports
from ci_magic.replay import ReplayPlan, plan_from_entry, plan_from_notebook, plan_from_result, this_notebook
from ci_magic.result import Result
from ci_magic.variables.discover import prompt_variables, push_items, resolve_variables

__all__ = ["CIMagics", "line_prompts_keep_question_marks", "split_options"]

# Options of %ci that take a value: the words after them belong to the option, not the prompt.
VALUED_OPTIONS = {"--model", "-m", "-o", "--output", "-v", "--vars"}


def split_options(line: str) -> tuple[str, str]:
    """Split ``%ci --new -o r what's the mean?`` into options and a free-text prompt.

    Prompts are prose (apostrophes, quotes, dashes), so they are never shell-split.
    """
    words = line.split()
    taken: list[str] = []
    index = 0
    while index < len(words) and words[index].startswith("-") and words[index] != "-":
        taken.append(words[index])
        if words[index] in VALUED_OPTIONS and index + 1 < len(words):
            taken.append(words[index + 1])
            index += 1
        index += 1
    prompt_start = 0
    for word in taken:
        prompt_start = line.index(word, prompt_start) + len(word)
    return " ".join(shlex.quote(w) for w in taken), line[prompt_start:].strip()


# `%ci what files do we have?` or `answer = %ci ...?`: a prompt, not IPython's `name?` help.
# (`%ci?` alone, with nothing after the magic's name, still shows the magic's help.)
_LINE_PROMPT = re.compile(
    r"^(?P<indent>[ \t]*)(?P<target>[\w.]+[ \t]*=[ \t]*)?%ci[ \t]+(?P<prompt>\S.*\?)[ \t]*$"
)


def line_prompts_keep_question_marks(lines: list[str]) -> list[str]:
    """An input transformer (``shell.input_transformers_cleanup``): a ``%ci`` line ending in ``?``
    becomes an explicit ``run_line_magic`` call before IPython's help syntax would claim it."""
    changed = []
    for line in lines:
        match = _LINE_PROMPT.match(line.rstrip("\n"))
        if match is not None:
            target = match["target"] or ""
            call = f"get_ipython().run_line_magic('ci', {match['prompt']!r})"
            line = f"{match['indent']}{target}{call}\n"
        changed.append(line)
    return changed


@magics_class
class CIMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.interpreter = CodeInterpreter(shell=shell)
        shell.configurables.append(self.interpreter)

    @property
    def _shell(self) -> Any:
        assert self.shell is not None, "IPython gives every registered Magics its shell"
        return self.shell

    @property
    def _user_ns(self) -> dict[str, Any]:
        return self._shell.user_ns

    # -- %%ci ----------------------------------------------------------------------------------

    @magic_arguments()
    @argument("--model", "-m", help="Model for this cell (default: CodeInterpreter.model).")
    @argument("--new", action="store_true", help="Start a fresh conversation (the container and files stay).")
    @argument("--insert", action="store_true", help="Put the code that ran into a new cell below.")
    @argument("-o", "--output", metavar="NAME", help="Also bind the Result to NAME (it is always in _ci).")
    @argument("--quiet", "-q", action="store_true", help="Show only the final outputs, not the live stream.")
    @argument(
        "-v",
        "--vars",
        metavar="A,B",
        help="Variables to send as files, besides data-like names in the prompt.",
    )
    @line_cell_magic
    def ci(self, line: str, cell: str | None = None) -> None:
        """Ask the code interpreter: the model writes Python, runs it in the sandbox, shows the results.

        Cell form: options on the first line, the prompt below. Line form: ``%ci [options] prompt``.
        DataFrames, arrays and other data-like variables named in the prompt are sent as files to
        /mnt/data with a schema card; generated files are saved in CodeInterpreter.output_dir.
        The Result (code, outputs, text, files, usage) is bound to ``_ci``.
        """
        options_text, line_prompt = split_options(line)
        args = parse_argstring(self.ci, options_text)
        prompt = cell if cell is not None else line_prompt
        if cell is not None and line_prompt:
            prompt = f"{line_prompt}\n{cell}"
        names = [n.strip() for n in (args.vars or "").split(",") if n.strip()]
        namespace = self._user_ns
        variables = resolve_variables(names, namespace)  # -v names; then data-like names in the prompt
        if self.interpreter.auto_push:
            for name in prompt_variables(prompt, namespace):
                variables.setdefault(name, namespace[name])
        self._run_turn(
            lambda: self.interpreter.run(
                prompt, variables=variables, new=args.new, model=args.model, quiet=args.quiet
            ),
            output=args.output,
            insert=args.insert,
        )

    @magic_arguments()
    @argument("-o", "--output", metavar="NAME", help="Also bind the Result to NAME (it is always in _ci).")
    @argument("--quiet", "-q", action="store_true", help="Show only the final outputs.")
    @cell_magic
    def ci_exec(self, line: str, cell: str) -> None:
        """Run the cell's Python code verbatim in the session's container.

        On the local backend no model is involved; on the openai backend the model is asked to run
        the code unchanged with forced tool use.
        """
        args = parse_argstring(self.ci_exec, line)
        self._run_turn(
            lambda: self.interpreter.exec(cell, quiet=args.quiet), output=args.output, insert=False
        )

    # -- reproducing ---------------------------------------------------------------------------

    @magic_arguments()
    @argument("name", nargs="?", help="A Result bound with -o NAME (default: the last turn).")
    @argument("--cell", type=int, metavar="N", help="Re-run cell In [N] of the saved notebook (its record).")
    @argument("--notebook", metavar="PATH", help="The saved notebook --cell reads (default: this one).")
    @argument("-o", "--output", metavar="NAME", help="Also bind the Result to NAME (it is always in _ci).")
    @argument("--quiet", "-q", action="store_true", help="Show only the final outputs.")
    @line_magic
    def ci_replay(self, line: str) -> None:
        """Run recorded code again in the current container, without asking the model to write any:
        the last turn, a bound Result (%ci_replay NAME) or a saved cell (%ci_replay --cell N).
        Calls that failed are left out. On the openai backend the code goes through one forced run."""
        args = parse_argstring(self.ci_replay, line)
        plan = self._replay_plan(args.name, args.cell, args.notebook)
        print(plan.line())
        self._run_turn(
            lambda: self.interpreter.replay(plan, quiet=args.quiet), output=args.output, insert=False
        )

    def _replay_plan(self, name: str | None, cell: int | None, notebook: str | None) -> ReplayPlan:
        if name is not None and cell is not None:
            raise UsageError("Give a Result's name or --cell N, not both.")
        if cell is not None:
            path = Path(notebook).expanduser() if notebook else this_notebook(self._user_ns)
            if path is None:
                raise ConfigurationError(
                    "This kernel was not told which notebook file it runs, so --cell cannot find the saved "
                    "cell. Name the file: %ci_replay --cell N --notebook analysis.ipynb."
                )
            return plan_from_notebook(path, cell)
        if name is not None:
            value = self._user_ns.get(name)
            if not isinstance(value, Result):
                raise VariableError(
                    f"{name} is not a ci-magic Result. Bind one with %%ci -o {name} (or use _ci, the last "
                    "one), or re-run a saved cell with %ci_replay --cell N."
                )
            return plan_from_result(value, name)
        return plan_from_entry(self.interpreter.last_turn())

    @magic_arguments()
    @argument("path", help="Where to write: a .py script or a .ipynb notebook (inputs go beside it).")
    @line_magic
    def ci_export(self, line: str) -> None:
        """Write the code this session ran, in order, as a plain script that runs without the model
        or ci-magic: pushed inputs beside it, /mnt/data paths pointing at its folder, failed calls
        as comments."""
        args = parse_argstring(self.ci_export, line)
        print(self.interpreter.export(args.path).line())

    def _run_turn(self, run: Callable[[], Result], *, output: str | None, insert: bool) -> None:
        """Run a turn and bind its Result to ``_ci`` (and ``output``), also when it failed."""
        if output is not None and not output.isidentifier():
            raise UsageError(f"-o needs a Python identifier, not {output!r}.")
        try:
            result = run()
        except CIError as error:
            partial = getattr(error, "result", None)
            if partial is not None:
                self._bind(partial, output)
            raise
        self._bind(result, output)
        if insert and result.code:
            self._shell.set_next_input(result.code, replace=False)

    def _bind(self, result: Result, output: str | None) -> None:
        self._user_ns["_ci"] = result
        if output:
            self._user_ns[output] = result

    # -- session -------------------------------------------------------------------------------

    @magic_arguments()
    @line_magic
    def ci_status(self, line: str) -> None:
        """Show the backend, model, container (id, status, expiry), files and tokens used this session."""
        parse_argstring(self.ci_status, line)
        _show(reports.status_bundle(self.interpreter.status()))

    @magic_arguments()
    @line_magic
    def ci_reset(self, line: str) -> None:
        """Start over: delete the container, forget the conversation, and rebuild the backend from the
        current configuration and environment (a new API key takes effect). Pushed variables are re-sent."""
        parse_argstring(self.ci_reset, line)
        self.interpreter.reset()
        print("ci-magic: the next cell starts a new container and a fresh conversation.")

    # -- files ---------------------------------------------------------------------------------

    @magic_arguments()
    @argument("names", nargs="+", help="Variables (or paths to files) to send to /mnt/data.")
    @argument("--as", dest="as_name", metavar="FILENAME", help="File name in the container (one name only).")
    @argument("--format", "-f", dest="fmt", help="File format: parquet, csv, json, npy, txt, png...")
    @argument(
        "--pickle",
        action="store_true",
        help="Allow pickling objects of other types (the sandbox may lack the class).",
    )
    @line_magic
    def ci_push(self, line: str) -> None:
        """Send notebook variables or files to the sandbox's /mnt/data (unchanged ones are not re-sent)."""
        args = parse_argstring(self.ci_push, line)
        requests = push_items(
            args.names, self._user_ns, fmt=args.fmt, filename=args.as_name, allow_pickle=args.pickle
        )
        outcomes, notices = self.interpreter.push_requests(requests)
        for text in reports.push_lines(outcomes, notices):
            print(text)

    @magic_arguments()
    @argument("filename", nargs="?", help="A file in /mnt/data (see %%ci_files).")
    @argument("-o", "--output", metavar="NAME", help="Variable to bind (default: the file's stem).")
    @argument("--all", action="store_true", help="Pull every file the model made.")
    @line_magic
    def ci_pull(self, line: str) -> Any:
        """Bring a container file back as a Python object: csv/parquet/xlsx -> DataFrame, npy -> ndarray,
        json -> object, txt -> str, png -> image; anything else -> bytes. Never unpickles."""
        args = parse_argstring(self.ci_pull, line)
        if args.all == bool(args.filename):
            raise UsageError("Give one file name (%ci_pull clean.csv) or --all, not both or neither.")
        if args.output is not None and not args.output.isidentifier():
            raise VariableError(f"-o needs a Python identifier, not {args.output!r}.")
        namespace = self._user_ns
        if args.all:
            pulled = self.interpreter.pull_all()
            for item in pulled:
                if item.kind == "skipped":  # over the download cap: its one line, then the others
                    print(item.error)
                elif item.variable:
                    namespace[item.variable] = item.value
                    print(reports.pull_line(item.variable, item))
                else:  # cfile_<hex>.png: a name the backend made, no one's variable
                    print(f"{item.name}: saved to {item.path} (not bound: the backend named it)")
            if not pulled:
                print("The model has not made any files yet.")
            return None
        # Bind only what the user asked for: -o NAME, or the file's stem when the value is not
        # already being assigned (``sq2 = %ci_pull squares.csv`` must leave ``squares`` alone).
        target = _assigned_to()
        item = self.interpreter.pull_file(args.filename)
        if args.output or target is None:
            name = args.output or item.variable
            namespace[name] = item.value
        else:
            name = target or "the value"
        if item.kind == "image":
            _show(
                {item.mime or "image/png": item.path.read_bytes(), "text/plain": f"{item.name} ({item.path})"}
            )
        print(reports.pull_line(name, item))
        return item.value

    @magic_arguments()
    @line_magic
    def ci_files(self, line: str) -> None:
        """List the container's files: name, size, source (notebook / model), created."""
        parse_argstring(self.ci_files, line)
        table = reports.files_bundle(self.interpreter.files())
        if table is None:
            print(reports.NO_FILES)
        else:
            _show(table)


def _assigned_to() -> str | None:
    """Where the cell running this line magic stores its value: ``x = %ci_pull f`` -> ``"x"``,
    another target (``d["k"] = ...``) -> ``""``, a bare statement -> None.

    IPython turns the line into ``x = get_ipython().run_line_magic(...)``: the instruction after
    that call in the calling frame says whether the value is stored, and under which name.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "run_line_magic":
        frame = frame.f_back
    caller = frame.f_back if frame is not None else None
    if caller is None:
        return None
    for op in dis.get_instructions(caller.f_code):
        if op.offset <= caller.f_lasti or op.opname in ("CACHE", "EXTENDED_ARG", "NOP"):
            continue
        if op.opname.startswith("LOAD_"):  # the target's parts: ``d`` and ``"k"`` in d["k"] = ...
            continue
        if op.opname in ("STORE_NAME", "STORE_FAST", "STORE_GLOBAL", "STORE_DEREF"):
            return str(op.argval)
        return "" if op.opname.startswith(("STORE_", "UNPACK_")) else None
    return None


def _show(bundle: dict[str, Any]) -> None:
    from IPython.display import display

    display(bundle, raw=True)
