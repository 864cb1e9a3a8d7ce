"""The `llava-gguf` command line, a front end: parse, call one library function, render.

    app.py               the typer app, the commands' registration, main() (one-line errors and warnings)
    commands_produce.py  convert, quantize, imatrix, repair
    commands_check.py    inspect, verify, quality, doctor
    commands_run.py      chat, demo
    render.py            every report as text and as its --json line
    repl.py              chat's interactive session
    progress.py          rich progress bars on a terminal"""
