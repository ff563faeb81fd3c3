"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/ui_components.py`` (gradio 3.41.2).

Only the pieces an extension's ``ui()`` uses: ``FormComponent``, ``FormRow``, ``FormColumn``,
``FormGroup``, ``FormHTML``, ``ToolButton`` and ``InputAccordion`` (the gradio-3 version: a subclass of
``gr.Checkbox`` that hides itself and builds a ``gr.Accordion``; its bool value is the script arg).
"""

import gradio as gr


class FormComponent:
    """Mirrors ``ui_components.FormComponent`` (marker mixin: allowed inside gradio forms)."""

    webui_do_not_create_gradio_pyi_thank_you = True

    def get_expected_parent(self):
        """Mirrors ``FormComponent.get_expected_parent``."""
        return gr.components.Form


class ToolButton(gr.Button, FormComponent):
    """Mirrors ``ui_components.ToolButton``: small emoji button with the ``tool`` CSS class."""

    def __init__(self, value="", *args, elem_classes=None, **kwargs):
        """Mirrors ``modules/ui_components.py: ToolButton.__init__``."""
        elem_classes = elem_classes or []
        super().__init__(value=value, *args, elem_classes=["tool", *elem_classes], **kwargs)

    def get_block_name(self):
        """Mirrors ``ToolButton.get_block_name``."""
        return "button"


class FormRow(gr.Row, FormComponent):
    """Mirrors ``ui_components.FormRow`` (gr.Row usable inside forms)."""

    def get_block_name(self):
        """Mirrors ``FormRow.get_block_name``."""
        return "row"


class FormColumn(gr.Column, FormComponent):
    """Mirrors ``ui_components.FormColumn``."""

    def get_block_name(self):
        """Mirrors ``FormColumn.get_block_name``."""
        return "column"


class FormGroup(gr.Group, FormComponent):
    """Mirrors ``ui_components.FormGroup``."""

    def get_block_name(self):
        """Mirrors ``FormGroup.get_block_name``."""
        return "group"


class FormHTML(gr.HTML, FormComponent):
    """Mirrors ``ui_components.FormHTML``."""

    def get_block_name(self):
        """Mirrors ``FormHTML.get_block_name``."""
        return "html"


class InputAccordion(gr.Checkbox):
    """Mirrors A1111 1.10 ``ui_components.InputAccordion(gr.Checkbox)`` for gradio 3.41.2.

    A hidden checkbox (``elem_id=f"{id}-checkbox"``, ``visible=False``) whose bool value is the input
    the hooks receive, plus a ``gr.Accordion(elem_id=id, open=value, elem_classes=['input-accordion'])``
    entered by ``with InputAccordion(...) as enabled:``. ``id`` is the ``elem_id`` kwarg or
    ``input-accordion-<n>``. Must be created inside a ``gr.Blocks`` (it registers a ``change`` event).
    """

    global_index = 0

    def __init__(self, value, **kwargs):
        """Mirrors ``modules/ui_components.py: InputAccordion.__init__``."""
        self.accordion_id = kwargs.get('elem_id')
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1

        checkbox_kwargs = dict(kwargs)
        checkbox_kwargs["elem_id"] = f"{self.accordion_id}-checkbox"
        checkbox_kwargs["visible"] = False
        super().__init__(value, **checkbox_kwargs)

        self.change(fn=None, _js='function(checked){ inputAccordionChecked("' + self.accordion_id + '", checked); }', inputs=[self])

        accordion_kwargs = dict(kwargs)
        accordion_kwargs.update(elem_id=self.accordion_id, label=kwargs.get('label', 'Accordion'),
                                elem_classes=['input-accordion'], open=value)
        self.accordion = gr.Accordion(**accordion_kwargs)

    def extra(self):
        """Mirrors ``InputAccordion.extra``: a ``gr.Column`` placed in the accordion header."""
        return gr.Column(elem_id=self.accordion_id + '-extra', elem_classes='input-accordion-extra', min_width=0)

    def __enter__(self):
        """Mirrors ``InputAccordion.__enter__``: enter the accordion, return the checkbox."""
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        """Mirrors ``InputAccordion.__exit__``."""
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        """Mirrors ``InputAccordion.get_block_name`` (renders as a checkbox)."""
        return "checkbox"
