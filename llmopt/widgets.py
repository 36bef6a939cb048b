"""Interactive panels: a widget is only a front end for a plain function (every notebook).

`panel(run_experiment, render, prompt=Text(...), k=IntSlider(...))` shows the
controls and, on every change, calls `render(run_experiment(**values))` into an
output area. The notebook also calls `run_experiment` directly, so CI exercises
the same logic headless.
"""
from __future__ import annotations

from collections.abc import Callable


def slider(kind: str, value, min, max, step=None, description: str = ""):
    """An ipywidgets slider ("int" or "float") that only fires on release."""
    import ipywidgets as w
    cls = w.IntSlider if kind == "int" else w.FloatSlider
    kwargs = dict(value=value, min=min, max=max, description=description or "",
                  continuous_update=False, style={"description_width": "initial"})
    if step is not None:
        kwargs["step"] = step
    return cls(**kwargs)


def text(value: str, description: str = "", width: str = "90%"):
    """A text box (multi-line, so prompts keep their line breaks) that fires when it loses focus."""
    import ipywidgets as w
    return w.Textarea(value=value, description=description, continuous_update=False,
                      rows=max(2, value.count("\n") + 1), layout=w.Layout(width=width),
                      style={"description_width": "initial"})


def panel(run_experiment: Callable[..., dict], render: Callable[[dict], None], **controls):
    """Controls + output area; each change re-runs `run_experiment` and `render`s its dict.

    Errors (say, a prompt too long for the model) are shown in the panel, not raised,
    so one bad setting never breaks the notebook.
    """
    import ipywidgets as w
    from IPython.display import display

    out = w.Output()

    def update(_change=None):
        values = {name: c.value for name, c in controls.items()}
        with out:
            out.clear_output(wait=True)
            try:
                render(run_experiment(**values))
            except ValueError as e:
                print(f"ValueError: {e}")

    for c in controls.values():
        c.observe(update, names="value")
    box = w.VBox([*controls.values(), out])
    display(box)
    update()
    return box
