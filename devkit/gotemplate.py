"""Ollama's side of a Modelfile, in Python, for tests without Go or Ollama: the subset of Go's text/template
that llava-gguf's TEMPLATEs use (with Go's semantics: `{{-`/`-}}` trimming, if/else if/else, range with
`$i, $x :=`, variables declared with `:=` and assigned with `=` in Go's scopes, `$.Field`, and the functions
eq ne lt le gt ge, and/or (short-circuit, returning an operand), not, len and slice (byte-wise on strings),
print, printf, index), the Modelfile parser (parser/parser.go `ParseFile`, ported state by state), and what
Ollama hands a template for a chat with images (server/prompt.go `chatPrompt`: `[img-N]` tags before the text;
template/template.go `collate`). Anything outside the subset is an error, never a guess."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field


class GoTemplateError(Exception):
    """A template or Modelfile outside what this port reads (or one Go itself would refuse)."""


# ------------------------------------------------------------------ lexing
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(`[^`]*`)|(-?\d+)|(\$[A-Za-z0-9_]*(?:\.[A-Za-z_]\w*)*)'
                    r'|((?:\.[A-Za-z_]\w*)+)|(\.)|([A-Za-z_]\w*)|(:=|=|,|\(|\)|\|))')
_SPACE = " \t\r\n"


def _pieces(src: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) in order, with the trim markers applied to the texts around them."""
    out: list[tuple[str, str]] = []
    i, trim_next = 0, False
    while True:
        j = src.find("{{", i)
        text = src[i:] if j < 0 else src[i:j]
        if trim_next:
            text = text.lstrip(_SPACE)
        if j < 0:
            out.append(("text", text))
            return out
        k = j + 2
        if src[k:k + 1] == "-" and src[k + 1:k + 2] in tuple(_SPACE):
            text, k = text.rstrip(_SPACE), k + 1
        out.append(("text", text))
        end, in_str = k, None
        while True:  # the closing braces, outside string literals
            if end >= len(src):
                raise GoTemplateError("unclosed action")
            c = src[end]
            if in_str:
                if c == "\\" and in_str == '"':
                    end += 1
                elif c == in_str:
                    in_str = None
            elif c in "\"`":
                in_str = c
            elif src.startswith("}}", end):
                break
            end += 1
        body = src[k:end]
        trim_next = len(body) >= 2 and body[-1] == "-" and body[-2] in _SPACE
        out.append(("action", body[:-1] if trim_next else body))
        i = end + 2


def _tokens(action: str) -> list[tuple[str, str]]:
    kinds = ("str", "raw", "num", "var", "field", "dot", "ident", "punct")
    toks, pos = [], 0
    while action[pos:].strip():
        if not (m := _TOKEN.match(action, pos)):
            raise GoTemplateError(f"cannot read {action[pos:]!r}")
        toks.append((next(k for k, g in zip(kinds, m.groups()) if g is not None), m.group(m.lastindex)))
        pos = m.end()
    return toks


# ------------------------------------------------------------------ parsing
@dataclass
class Pipe:
    decl: list[str]  # variables declared (:=) or assigned (=)
    assign: bool
    cmds: list[list]  # each command: operands (tokens or nested Pipes)


@dataclass
class Node:
    kind: str  # text | action | if | range
    text: str = ""
    pipe: Pipe | None = None
    branches: list = field(default_factory=list)  # if: [(pipe, body)]; range: [(pipe, body)]
    else_body: list | None = None


def _parse_pipe(toks: list[tuple[str, str]]) -> Pipe:
    decl, assign = [], False
    for op in (":=", "="):
        if ("punct", op) in toks and all(k in ("var", "punct") for k, _ in toks[:toks.index(("punct", op))]):
            head = toks[:toks.index(("punct", op))]
            decl = [v for k, v in head if k == "var"]
            assign, toks = op == "=", toks[len(head) + 1:]
            break
    cmds, stack, cur = [], [], []
    for tok in toks:
        if tok == ("punct", "("):
            stack.append((cmds, cur))
            cmds, cur = [], []
        elif tok == ("punct", ")"):
            inner = Pipe([], False, cmds + [cur])
            cmds, cur = stack.pop()
            cur.append(inner)
        elif tok == ("punct", "|"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    if stack:
        raise GoTemplateError("unbalanced parentheses")
    return Pipe(decl, assign, cmds + [cur])


def parse(src: str) -> list[Node]:
    root: list[Node] = []
    stack: list[tuple[Node, list[Node]]] = []  # open if/range and the body being filled
    body = root
    for kind, s in _pieces(src):
        if kind == "text":
            if s:
                body.append(Node("text", s))
            continue
        toks = _tokens(s)
        if not toks:
            raise GoTemplateError("empty action")
        word = toks[0][1] if toks[0][0] == "ident" else None
        if word in ("if", "range"):
            node = Node(word)
            node.branches.append((_parse_pipe(toks[1:]), []))
            body.append(node)
            stack.append((node, body))
            body = node.branches[-1][1]
        elif word == "else":
            node = stack[-1][0]
            if len(toks) > 1 and toks[1] == ("ident", "if") and node.kind == "if":
                node.branches.append((_parse_pipe(toks[2:]), []))
                body = node.branches[-1][1]
            else:
                node.else_body = body = []
        elif word == "end":
            body = stack.pop()[1]
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{word} is outside the subset")
        else:
            body.append(Node("action", pipe=_parse_pipe(toks)))
    if stack:
        raise GoTemplateError("missing end")
    return root


# ------------------------------------------------------------------ evaluation
def truth(v) -> bool:
    return not (v is None or v is False or v == 0 and not isinstance(v, str) or (hasattr(v, "__len__") and len(v) == 0))


def _b(s: str) -> bytes:  # Go's strings are bytes: len and slice count bytes
    return s.encode("utf-8", "surrogateescape")


def _sprint(args) -> str:
    out = ""
    for i, a in enumerate(args):  # Go's Sprint: a space between operands when neither is a string
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += fmt(a)
    return out


def _printf(form: str, *args) -> str:
    it = iter(args)
    return re.sub(r"%([%sdvq])", lambda m: "%" if m[1] == "%" else fmt(next(it)) if m[1] != "q"
                  else '"' + fmt(next(it)) + '"', form)


def _slice(x, *ij):  # Go's slice x i j: x[i:j], x[i:] with one index
    cut = slice(*ij) if len(ij) == 2 else slice(ij[0] if ij else None, None)
    return _b(x)[cut].decode("utf-8", "surrogateescape") if isinstance(x, str) else x[cut]


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "not": lambda a: not truth(a),
    "len": lambda x: len(_b(x)) if isinstance(x, str) else len(x), "slice": _slice, "index": lambda x, i: x[i],
    "print": lambda *a: _sprint(a), "printf": _printf,
}


def fmt(v) -> str:
    """A value as Go prints it (bools, nil, byte slices)."""
    if isinstance(v, (bool, type(None), bytes)):
        return {True: "true", False: "false", None: "<no value>"}.get(v) or str(list(v)).replace(",", "")
    return str(v)


def _var(st: list[list], name: str) -> list:
    """The innermost [name, value] of a declared variable (Go's variable stack, `$` at its bottom)."""
    for pair in reversed(st):
        if pair[0] == name:
            return pair
    raise GoTemplateError(f"undefined variable {name}")


def _field(obj, names: list[str]):
    for n in names:
        if not isinstance(obj, dict) or n not in obj:
            raise GoTemplateError(f"no field {n} in {type(obj).__name__}")
        obj = obj[n]
    return obj


def _operand(tok, dot, st: list):
    if isinstance(tok, Pipe):
        return _pipe(tok, dot, st)
    kind, s = tok
    if kind == "var":
        name, *names = s.split(".")
        return _field(_var(st, name)[1], names)
    read = {"str": ast.literal_eval, "raw": lambda t: t[1:-1], "num": int, "dot": lambda _t: dot,
            "field": lambda t: _field(dot, t.split(".")[1:])}
    if kind not in read:
        raise GoTemplateError(f"unexpected {s!r}")
    return read[kind](s)


def _command(cmd: list, dot, st: list, last=None, piped: bool = False):
    head = cmd[0]
    if not isinstance(head, Pipe) and head[0] == "ident":
        name = head[1]
        if name in ("and", "or"):  # short-circuit: operands are evaluated until one decides
            args = [lambda t=t: _operand(t, dot, st) for t in cmd[1:]] + ([lambda: last] if piped else [])
            v = None
            for a in args:
                v = a()
                if truth(v) != (name == "and"):
                    return v
            return v
        if name not in FUNCS:
            raise GoTemplateError(f"function {name} is outside the subset")
        args = [_operand(t, dot, st) for t in cmd[1:]] + ([last] if piped else [])
        return FUNCS[name](*args)
    if len(cmd) != 1 or piped:
        raise GoTemplateError("only a function takes arguments")
    return _operand(head, dot, st)


def _pipe(p: Pipe, dot, st: list):
    v, piped = None, False
    for cmd in p.cmds:
        v, piped = _command(cmd, dot, st, v, piped), True
    if p.assign:
        _var(st, p.decl[0])[1] = v
    elif p.decl:
        st.append([p.decl[0], v])
    return v


def _run(nodes: list[Node], dot, st: list, out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "action":
            v = _pipe(n.pipe, dot, st)
            if not n.pipe.decl:
                out.append(fmt(v))
        elif n.kind == "if":
            mark = len(st)
            for p, body in n.branches:
                if truth(_pipe(p, dot, st)):
                    _run(body, dot, st, out)
                    break
            else:
                if n.else_body is not None:
                    _run(n.else_body, dot, st, out)
            del st[mark:]
        elif n.kind == "range":
            p, body = n.branches[0]
            names = p.decl
            seq = _pipe(Pipe([], False, p.cmds), dot, st)
            if not isinstance(seq, (list, tuple)):
                raise GoTemplateError("range over a non-list is outside the subset")
            mark = len(st)
            for i, item in enumerate(seq):
                if len(names) == 2:
                    st += [[names[0], i], [names[1], item]]
                elif names:
                    st.append([names[0], item])
                _run(body, item, st, out)
                del st[mark:]
            if not seq and n.else_body is not None:
                _run(n.else_body, dot, st, out)


def render(src: str, data: dict) -> str:
    out: list[str] = []
    _run(parse(src), data, [["$", data]], out)
    return "".join(out)


# ------------------------------------------------------------------ Ollama: the Modelfile and the chat's values
_COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires"}


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _next_state(r: str, state: str) -> tuple[str, str]:
    """parser.go `parseRuneForState`: (next state, the rune to keep or "")."""
    space, newline = r in " \t", r in "\r\n"
    if state == "nil":
        return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha() or space:
            return ("value", "") if space else ("name", r)
        raise GoTemplateError("command must be one of ...")
    if state == "value":
        return ("nil", r) if space or newline else ("value", r)
    if state in ("parameter", "message"):
        if r.isascii() and (r.isalpha() or state == "parameter" and (r.isdigit() or r == "_")) or space:
            return ("value", "") if space else (state, r)
        raise GoTemplateError("unexpected EOF")
    return ("nil", "") if newline else ("comment", "")  # comment


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's parser reads them ("model" for FROM, the parameter's name for
    PARAMETER), unprintable characters outside values dropped as Ollama drops them."""
    cmds: list[tuple[str, str]] = []
    state, buf, name, role = "nil", "", "", ""
    for r in text:
        nxt, keep = _next_state(r, state)
        if nxt != state:
            if state == "name":
                if buf.lower() not in _COMMANDS:
                    raise GoTemplateError(f"invalid command {buf!r}")
                s = buf.lower()
                name = "model" if s == "from" else s
                nxt = {"parameter": "parameter", "message": "message"}.get(s, nxt)
            elif state == "parameter":
                name = buf
            elif state == "message":
                role = buf
            elif state == "value":
                s, ok = _unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                cmds.append((name, f"{role}: {s}" if role else s))
                role = ""
            buf, state = "", nxt
        if keep and keep.isprintable():
            buf += keep
    if state == "value":
        s, ok = _unquote(buf.strip())
        if not ok:
            raise GoTemplateError("unexpected EOF")
        cmds.append((name, f"{role}: {s}" if role else s))
    elif state not in ("nil", "comment"):
        raise GoTemplateError("unexpected EOF")
    return cmds


def ollama_values(messages: list[tuple[str, str, int]]) -> dict:
    """What Ollama's chat hands a TEMPLATE that uses .Messages, for (role, text, number of images) messages:
    each image tagged `[img-N]` before the text, or in place of a `[img]` the text holds (chatPrompt), and
    consecutive messages of one role merged with a blank line, keeping the first one's images (collate)."""
    tagged, n = [], 0
    for role, text, k in messages:
        prefix = ""
        for _ in range(k):
            tag, n = f"[img-{n}]", n + 1
            if "[img]" in text:
                text = text.replace("[img]", tag, 1)
            else:
                prefix += tag
        tagged.append({"Role": role, "Content": prefix + text, "Images": [b"\x89PNG"] * k})
    collated: list[dict] = []
    for m in tagged:
        if collated and collated[-1]["Role"] == m["Role"] and m["Role"] != "tool":
            collated[-1] = {**collated[-1], "Content": collated[-1]["Content"] + "\n\n" + m["Content"]}
        else:
            collated.append(m)
    system = "\n\n".join(m["Content"] for m in tagged if m["Role"] == "system")
    return {"System": system, "Messages": collated, "Tools": None, "Response": "", "Think": False}


def ollama_generate_values(prompt: str, n_images: int, system: str | None = None) -> dict:
    """What Ollama's /api/generate hands a TEMPLATE (server/routes.go GenerateHandler): the system prompt, one
    user message per image holding only its tag (no .Images), then the prompt, collated."""
    msgs = [("system", system, 0)] if system else []
    return ollama_values(msgs + [("user", f"[img-{i}]", 0) for i in range(n_images)] + [("user", prompt, 0)])
