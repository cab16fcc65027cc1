"""Renders one chat template in a process of its own, under hard limits (run by edgevlm.tokenizer).

`python -I chat_template_worker.py` reads a JSON request on stdin: {"template", "variables", "max_chars",
"memory_bytes", "cpu_seconds"}. It writes {"text": ...} or {"error": ...} (the end of a sentence that starts
"the model's chat template") as JSON on stdout, or exits with MEMORY_EXIT when the template needs more memory
than it is given. It imports nothing from edgevlm: run by path, it loads neither the package nor numpy/PIL.
"""

import json
import os
import sys
from datetime import datetime

MEMORY_EXIT = 3  # the template needed more than memory_bytes (no output: writing it could fail too)


def environment():
    """The jinja2 environment transformers gives chat templates (transformers/utils/chat_template_utils.py)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def limit(memory_bytes: int, cpu_seconds: int) -> None:
    """Cap this process's address space at what it uses now plus `memory_bytes` (an allocation past that is a
    MemoryError, refused before it is made), and its CPU time, so that a child whose parent died stops too."""
    try:
        import resource

        # no core file when RLIMIT_CPU's SIGXCPU ends the process: it would be as large as the template made it
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, _capped(resource, resource.RLIMIT_CPU, cpu_seconds))
        with open("/proc/self/statm") as f:  # the interpreter's and jinja2's own address space, in pages
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, _capped(resource, resource.RLIMIT_AS, used + memory_bytes))
    except (ImportError, AttributeError, OSError, ValueError):
        # no `resource` (Windows), no RLIMIT_AS or no /proc (not Linux; macOS does not enforce RLIMIT_AS): the
        # parent's timeout is then the only bound, and memory is not
        pass


def _capped(resource, which: int, value: int) -> tuple[int, int]:
    hard = resource.getrlimit(which)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    return value, value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    env = environment()  # jinja2 imported before limit() measures what the process already uses
    limit(request["memory_bytes"], request["cpu_seconds"])
    max_chars = request["max_chars"]
    try:
        try:
            template = env.from_string(request["template"])
        except MemoryError:
            raise
        except Exception as e:  # jinja2's syntax errors, or anything a malformed template trips in the parser
            reply = {"error": f"does not parse: {_first_line(e)}"}
        else:
            out, size = [], 0
            for chunk in template.generate(**request["variables"]):
                size += len(chunk)
                if size > max_chars:
                    reply = {"error": f"writes more than {max_chars} characters; it is refused"}
                    break
                out.append(chunk)
            else:
                reply = {"text": "".join(out)}
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except Exception as e:  # a template may raise anything (raise_exception, a TypeError, RecursionError)
        reply = {"error": f"failed: {_first_line(e)}"}
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    main()
