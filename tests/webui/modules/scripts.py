"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/scripts.py``.

Mirrors the script layer the host gives an always-on extension: ``AlwaysVisible``, the ``Script`` base
class with every hook signature, ``ScriptClassData``/``scripts_data``, and ``ScriptRunner`` (script
instantiation per tab, UI building inside gradio Blocks that assigns ``args_from``/``args_to`` with
``inputs[0]`` reserved for the selectable-script dropdown, and one runner method per hook that calls
``script.<hook>(p, *p.script_args[args_from:args_to], **kw)`` inside try/except -> ``errors.report``).

Written from the host's behaviour, not copied. Deliberate simplifications (documented, not hidden):
- no extension discovery / metadata ordering (``list_scripts``); scripts are registered with
  ``test_only_register_script_class`` or loaded from a file with ``test_only_load_script_file``
  (which loads the module under its file basename, like ``script_loading.load_module``);
- ``ordered_scripts`` keeps load order (the host's user-sortable "Callback order" setting defaults to
  load order) but, like the host, skips scripts whose class does not override the hook;
- no ``scripts_auto_postprocessing``, no ``before_component``/``after_component`` gradio patching.
"""

import importlib.util
import inspect
import os
import re
import sys
from collections import namedtuple
from dataclasses import dataclass

import gradio as gr

from modules import errors

AlwaysVisible = object()
"""Mirrors ``modules/scripts.py: AlwaysVisible`` (sentinel returned by ``Script.show``)."""


class MaskBlendArgs:
    """Mirrors ``modules/scripts.py: MaskBlendArgs`` (1.8+, argument of ``on_mask_blend``)."""

    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        """Mirrors ``modules/scripts.py: MaskBlendArgs.__init__``."""
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    """Mirrors ``modules/scripts.py: PostSampleArgs`` (argument of ``post_sample``)."""

    def __init__(self, samples):
        """Mirrors ``modules/scripts.py: PostSampleArgs.__init__``."""
        self.samples = samples


class PostprocessImageArgs:
    """Mirrors ``modules/scripts.py: PostprocessImageArgs``; ``image`` is a latent tensor in this double."""

    def __init__(self, image):
        """Mirrors ``modules/scripts.py: PostprocessImageArgs.__init__``."""
        self.image = image


class PostProcessMaskOverlayArgs:
    """Mirrors ``modules/scripts.py: PostProcessMaskOverlayArgs``."""

    def __init__(self, index, mask_for_overlay, overlay_image):
        """Mirrors ``modules/scripts.py: PostProcessMaskOverlayArgs.__init__``."""
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:
    """Mirrors ``modules/scripts.py: PostprocessBatchListArgs``."""

    def __init__(self, images):
        """Mirrors ``modules/scripts.py: PostprocessBatchListArgs.__init__``."""
        self.images = images


@dataclass
class OnComponent:
    """Mirrors ``modules/scripts.py: OnComponent``."""

    component: object


class Script:
    """Mirrors ``modules/scripts.py: Script`` (the base class every extension script subclasses).

    Hook methods have exactly the host's signatures; the runner passes the script's slice of
    ``p.script_args`` positionally after ``p`` (and after ``processed``/``pp`` where the host does).
    """

    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        """Mirrors ``Script.title``: display name, also the API ``alwayson_scripts`` key."""
        raise NotImplementedError()

    def ui(self, is_img2img):
        """Mirrors ``Script.ui``: returns the gradio components whose values become the hook args."""
        pass

    def show(self, is_img2img):
        """Mirrors ``Script.show``: False (hidden), True (selectable) or ``AlwaysVisible``."""
        return True

    def run(self, p, *args):
        """Mirrors ``Script.run`` (selectable scripts only)."""
        pass

    def setup(self, p, *args):
        """Mirrors ``Script.setup``: called when ``p.script_args`` is assigned."""
        pass

    def before_process(self, p, *args):
        """Mirrors ``Script.before_process``: first thing in ``process_images``."""
        pass

    def process(self, p, *args):
        """Mirrors ``Script.process``: once per ``process_images``, before the batch loop."""
        pass

    def before_process_batch(self, p, *args, **kwargs):
        """Mirrors ``Script.before_process_batch`` (kwargs: batch_number, prompts, seeds, subseeds)."""
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        """Mirrors ``Script.after_extra_networks_activate`` (kwargs as process_batch + extra_network_data)."""
        pass

    def process_batch(self, p, *args, **kwargs):
        """Mirrors ``Script.process_batch`` (kwargs: batch_number, prompts, seeds, subseeds)."""
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Mirrors ``Script.process_before_every_sampling`` (1.10; kwargs: x, noise, c, uc).

        Called right before every sampler run: twice per batch with hires fix.
        """
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        """Mirrors ``Script.postprocess_batch`` (kwargs: images, batch_number)."""
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        """Mirrors ``Script.postprocess_batch_list``."""
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        """Mirrors ``Script.on_mask_blend`` (1.8+)."""
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        """Mirrors ``Script.post_sample`` (1.8+): after sampling, before (here: no) VAE decode."""
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        """Mirrors ``Script.postprocess_image``: once per output image."""
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        """Mirrors ``Script.postprocess_maskoverlay`` (1.8+)."""
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        """Mirrors ``Script.postprocess_image_after_composite`` (1.8+)."""
        pass

    def postprocess(self, p, processed, *args):
        """Mirrors ``Script.postprocess``: once at the end of ``process_images_inner`` (not in a finally)."""
        pass

    def before_component(self, component, **kwargs):
        """Mirrors ``Script.before_component`` (never called by this double)."""
        pass

    def after_component(self, component, **kwargs):
        """Mirrors ``Script.after_component`` (never called by this double)."""
        pass

    def on_before_component(self, callback, *, elem_id):
        """Mirrors ``Script.on_before_component``: records (elem_id, callback)."""
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):
        """Mirrors ``Script.on_after_component``: records (elem_id, callback)."""
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):
        """Mirrors ``Script.describe`` (unused upstream)."""
        return ""

    def elem_id(self, item_id):
        """Mirrors ``Script.elem_id``: ``script_[<tab>_]<sanitised title>_<item_id>``."""
        need_tabname = self.show(True) == self.show(False)
        tabname = (('img2img' if self.is_img2img else 'txt2img') + "_") if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'

    def before_hr(self, p, *args):
        """Mirrors ``Script.before_hr``: per batch, before the hires second pass."""
        pass


class ScriptBuiltinUI(Script):
    """Mirrors ``modules/scripts.py: ScriptBuiltinUI`` (setup only in the UI, short elem ids)."""

    setup_for_ui_only = True

    def elem_id(self, item_id):
        """Mirrors ``ScriptBuiltinUI.elem_id``."""
        need_tabname = self.show(True) == self.show(False)
        tabname = (('img2img' if self.is_img2img else 'txt2img') + "_") if need_tabname else ""
        return f'{tabname}{item_id}'


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
"""Mirrors ``modules/scripts.py: ScriptClassData(script_class, path, basedir, module)``."""

scripts_data = []
"""Mirrors ``modules/scripts.py: scripts_data`` (every loaded Script subclass, in load order)."""

postprocessing_scripts_data = []

_WEBUI_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
current_basedir = _WEBUI_ROOT


def basedir():
    """Mirrors ``modules/scripts.py: basedir`` (dir of the script being loaded)."""
    return current_basedir


def load_module(path):
    """Mirrors ``modules/script_loading.py: load_module``: module named after the file's basename."""
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _register_scripts_from_module(module, path, base):
    """Mirrors ``load_scripts.register_scripts_from_module``: every Script subclass in the module dict."""
    for script_class in module.__dict__.values():
        if inspect.isclass(script_class) and issubclass(script_class, Script):
            scripts_data.append(ScriptClassData(script_class, path, base, module))


def test_only_load_script_file(path, base=None):
    """TEST-ONLY. Mirrors one iteration of ``modules/scripts.py: load_scripts`` for one file.

    Loads ``path`` like the host (module name = basename, extension dir prepended to ``sys.path`` only
    while loading, import errors -> ``errors.report``) and registers every ``Script`` subclass found in
    the module dict (imported ones too, like the host). Returns the module or None.
    """
    global current_basedir
    base = base or os.path.dirname(os.path.dirname(os.path.abspath(path)))
    syspath = sys.path
    try:
        sys.path = [base] + sys.path
        current_basedir = base
        module = load_module(path)
        _register_scripts_from_module(module, path, base)
        return module
    except Exception:
        errors.report(f"Error loading script: {os.path.basename(path)}", exc_info=True)
        return None
    finally:
        sys.path = syspath
        current_basedir = _WEBUI_ROOT


def test_only_register_script_class(script_class, path=None, module=None):
    """TEST-ONLY. Append a Script subclass to ``scripts_data`` as ``load_scripts`` would have."""
    path = path or inspect.getsourcefile(script_class) or f"{script_class.__name__}.py"
    module = module or sys.modules.get(script_class.__module__)
    data = ScriptClassData(script_class, path, os.path.dirname(os.path.dirname(path)), module)
    scripts_data.append(data)
    return data


def test_only_load_builtin_xyz_grid():
    """TEST-ONLY. Load this double's ``scripts/xyz_grid.py`` as the host does (module ``"xyz_grid.py"``).

    Idempotent: returns the already registered module when present.
    """
    for data in scripts_data:
        if data.script_class.__module__ == "xyz_grid.py":
            return data.module
    return test_only_load_script_file(os.path.join(_WEBUI_ROOT, "scripts", "xyz_grid.py"), base=_WEBUI_ROOT)


def test_only_reset():
    """TEST-ONLY. Forget every registered script and runner (like a fresh ``load_scripts``)."""
    global scripts_txt2img, scripts_img2img, scripts_current
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()
    scripts_current = None


def test_only_build_ui(is_img2img=False, runner=None):
    """TEST-ONLY. Mirrors the script part of ``modules/ui.py: create_ui`` for one tab.

    ``initialize_scripts(is_img2img)``, then inside ``gr.Blocks()``: ``prepare_ui()`` and
    ``setup_ui()`` (always-on scripts' ``ui()``, the dropdown as ``inputs[0]``, selectable scripts),
    then ``infotext_utils.add_paste_fields(tab, None, runner.infotext_fields)`` (the host adds its
    builtin fields too; this double only has the scripts' fields). Without ``runner`` a fresh
    ``ScriptRunner`` replaces ``scripts_txt2img``/``scripts_img2img``. Returns the runner.
    """
    global scripts_txt2img, scripts_img2img, scripts_current
    if runner is None:
        # upstream load_scripts() makes fresh runners, so a rebuilt UI never accumulates infotext_fields
        runner = ScriptRunner()
        if is_img2img:
            scripts_img2img = runner
        else:
            scripts_txt2img = runner
    scripts_current = runner
    runner.initialize_scripts(is_img2img)
    with gr.Blocks() as demo:
        runner.prepare_ui()
        runner.setup_ui()
    runner.demo = demo
    scripts_current = None

    from modules import infotext_utils
    infotext_utils.add_paste_fields("img2img" if is_img2img else "txt2img", None, list(runner.infotext_fields))
    return runner


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    """Mirrors ``modules/scripts.py: wrap_call``: call, report exceptions, return ``default``."""
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    """Mirrors ``modules/scripts.py: ScriptRunner`` (one per tab: ``scripts_txt2img``/``scripts_img2img``)."""

    def __init__(self):
        """Mirrors ``modules/scripts.py: ScriptRunner.__init__``."""
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.callback_map = {}
        self.on_before_component_elem_id = {}
        self.on_after_component_elem_id = {}

    def initialize_scripts(self, is_img2img):
        """Mirrors ``ScriptRunner.initialize_scripts``: one instance per script class for this tab."""
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()

        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue

            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"

            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

        self.callback_map.clear()
        self.apply_on_before_component_callbacks()

    def apply_on_before_component_callbacks(self):
        """Mirrors ``ScriptRunner.apply_on_before_component_callbacks`` (collects, never fires here)."""
        for script in self.scripts:
            on_before = script.on_before_component_elem_id or []
            on_after = script.on_after_component_elem_id or []
            for elem_id, callback in on_before:
                self.on_before_component_elem_id.setdefault(elem_id, []).append((callback, script))
            for elem_id, callback in on_after:
                self.on_after_component_elem_id.setdefault(elem_id, []).append((callback, script))
            on_before.clear()
            on_after.clear()

    def create_script_ui(self, script):
        """Mirrors ``ScriptRunner.create_script_ui``: args_from = args_to = len(inputs), then build."""
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            self.create_script_ui_inner(script)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def create_script_ui_inner(self, script):
        """Mirrors ``ScriptRunner.create_script_ui_inner``: run ``ui()``, record api_info, extend inputs."""
        import modules.api.models as api_models

        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return

        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()

        api_args = []
        for control in controls:
            control.custom_script_source = os.path.basename(script.filename)
            arg_info = api_models.ScriptArg(label=getattr(control, "label", None) or "")
            for field in ("value", "minimum", "maximum", "step"):
                v = getattr(control, field, None)
                if v is not None:
                    setattr(arg_info, field, v)
            choices = getattr(control, 'choices', None)
            if choices is not None:
                arg_info.choices = [x[0] if isinstance(x, tuple) else x for x in choices]
            api_args.append(arg_info)

        script.api_info = api_models.ScriptInfo(
            name=script.name,
            is_img2img=script.is_img2img,
            is_alwayson=script.alwayson,
            args=api_args,
        )

        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names

        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):
        """Mirrors ``ScriptRunner.setup_ui_for_section``: each script's UI inside a ``gr.Group``."""
        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self):
        """Mirrors ``ScriptRunner.prepare_ui``: reset inputs to ``[None]`` (slot 0 = dropdown)."""
        self.inputs = [None]

    def setup_ui(self):
        """Mirrors ``ScriptRunner.setup_ui``; must run inside a ``gr.Blocks()`` context.

        Always-on scripts first (args start at 1), then the "Script" dropdown becomes ``inputs[0]``,
        then the selectable scripts. Returns ``self.inputs``.
        """
        all_titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.scripts]
        self.title_map = {title.lower(): s for title, s in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(s.title, s.filename, "title") or f"{s.filename} [error]" for s in self.selectable_scripts]

        self.setup_ui_for_section(None)

        dropdown = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles, value="None", type="index")
        self.inputs[0] = dropdown

        self.setup_ui_for_section(None, self.selectable_scripts)

        def select_script(script_index):
            """Mirrors the ``select_script`` closure of upstream ``ScriptRunner.setup_ui`` (dropdown -> group visibility)."""
            if script_index is None:
                script_index = 0
            selected = self.selectable_scripts[script_index - 1] if script_index > 0 else None
            return [gr.update(visible=selected == s) for s in self.selectable_scripts]

        dropdown.change(fn=select_script, inputs=[dropdown], outputs=[s.group for s in self.selectable_scripts])

        self.script_load_ctr = 0

        def onload_script_visibility(params):
            """Mirrors the ``onload_script_visibility`` closure of upstream ``ScriptRunner.setup_ui``."""
            title = params.get('Script', None)
            if title and title in self.titles:
                visibility = self.titles.index(title) == self.script_load_ctr
                self.script_load_ctr = (self.script_load_ctr + 1) % len(self.titles)
                return gr.update(visible=visibility)
            return gr.update(visible=False)

        self.infotext_fields.append((dropdown, lambda x: gr.update(value=x.get('Script', 'None'))))
        self.infotext_fields.extend([(s.group, onload_script_visibility) for s in self.selectable_scripts])

        self.apply_on_before_component_callbacks()
        return self.inputs

    def run(self, p, *args):
        """Mirrors ``ScriptRunner.run``: run the selectable script chosen by ``args[0]`` (1-based)."""
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        script_args = args[script.args_from:script.args_to]
        return script.run(p, *script_args)

    def list_scripts_for_method(self, method_name):
        """Mirrors ``ScriptRunner.list_scripts_for_method``."""
        if method_name in ('before_component', 'after_component'):
            return self.scripts
        return self.alwayson_scripts

    def ordered_scripts(self, method_name):
        """Mirrors ``ScriptRunner.ordered_scripts`` (1.9+) with the default (load) order.

        Like the host's ``create_ordered_callbacks_list``, scripts whose class does not override
        ``method_name`` are left out.
        """
        script_list = self.list_scripts_for_method(method_name)
        cached = self.callback_map.get(method_name)
        if cached is None or cached[0] != len(script_list):
            chosen = [s for s in script_list
                      if getattr(s.__class__, method_name, None) != getattr(Script, method_name, None)]
            cached = (len(script_list), chosen)
            self.callback_map[method_name] = cached
        return list(cached[1])

    def _run_hook(self, method_name, p, *lead, **kwargs):
        """Shared body of every hook runner: ``script.<hook>(p, *lead, *p.script_args[from:to], **kwargs)``.

        Each call is wrapped in try/except -> ``errors.report("Error running <hook>: <file>")`` so that a
        failing hook is logged and processing continues, like every ``ScriptRunner`` hook method upstream.
        """
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *lead, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def before_process(self, p):
        """Mirrors ``ScriptRunner.before_process``."""
        self._run_hook('before_process', p)

    def process(self, p):
        """Mirrors ``ScriptRunner.process``."""
        self._run_hook('process', p)

    def process_before_every_sampling(self, p, **kwargs):
        """Mirrors ``ScriptRunner.process_before_every_sampling`` (1.10; kwargs x, noise, c, uc)."""
        self._run_hook('process_before_every_sampling', p, **kwargs)

    def before_process_batch(self, p, **kwargs):
        """Mirrors ``ScriptRunner.before_process_batch``."""
        self._run_hook('before_process_batch', p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        """Mirrors ``ScriptRunner.after_extra_networks_activate``."""
        self._run_hook('after_extra_networks_activate', p, **kwargs)

    def process_batch(self, p, **kwargs):
        """Mirrors ``ScriptRunner.process_batch``."""
        self._run_hook('process_batch', p, **kwargs)

    def postprocess(self, p, processed):
        """Mirrors ``ScriptRunner.postprocess``: ``script.postprocess(p, processed, *args)``."""
        self._run_hook('postprocess', p, processed)

    def postprocess_batch(self, p, images, **kwargs):
        """Mirrors ``ScriptRunner.postprocess_batch``: ``images`` passed as keyword."""
        self._run_hook('postprocess_batch', p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        """Mirrors ``ScriptRunner.postprocess_batch_list``."""
        self._run_hook('postprocess_batch_list', p, pp, **kwargs)

    def post_sample(self, p, ps: PostSampleArgs):
        """Mirrors ``ScriptRunner.post_sample``."""
        self._run_hook('post_sample', p, ps)

    def on_mask_blend(self, p, mba: MaskBlendArgs):
        """Mirrors ``ScriptRunner.on_mask_blend``."""
        self._run_hook('on_mask_blend', p, mba)

    def postprocess_image(self, p, pp: PostprocessImageArgs):
        """Mirrors ``ScriptRunner.postprocess_image``."""
        self._run_hook('postprocess_image', p, pp)

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):
        """Mirrors ``ScriptRunner.postprocess_maskoverlay``."""
        self._run_hook('postprocess_maskoverlay', p, ppmo)

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):
        """Mirrors ``ScriptRunner.postprocess_image_after_composite``."""
        self._run_hook('postprocess_image_after_composite', p, pp)

    def before_hr(self, p):
        """Mirrors ``ScriptRunner.before_hr``."""
        self._run_hook('before_hr', p)

    def setup_scrips(self, p, *, is_ui=True):
        """Mirrors ``ScriptRunner.setup_scrips`` (sic): ``setup`` hooks; UI-only ones skipped for the API."""
        for script in self.alwayson_scripts:
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                script.setup(p, *script_args)
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def script(self, title):
        """Mirrors ``ScriptRunner.script``: lookup by lowercased title (after ``setup_ui``)."""
        return self.title_map.get(title.lower())

    def set_named_arg(self, args, script_name, arg_elem_id, value, fuzzy=False):
        """Mirrors 1.10 ``ScriptRunner.set_named_arg``: match ``script.name``, control by elem_id."""
        script = next((x for x in self.scripts if x.name == script_name), None)
        if script is None:
            raise RuntimeError(f"script {script_name} not found")
        for i, control in enumerate(script.controls):
            if arg_elem_id in control.elem_id if fuzzy else arg_elem_id == control.elem_id:
                index = script.args_from + i
                if isinstance(args, tuple):
                    return args[:index] + (value,) + args[index + 1:]
                elif isinstance(args, list):
                    args[index] = value
                    return args
                else:
                    raise RuntimeError(f"args is not a list or tuple, but {type(args)}")
        raise RuntimeError(f"arg_elem_id {arg_elem_id} not found in script {script_name}")


scripts_txt2img: ScriptRunner = ScriptRunner()
scripts_img2img: ScriptRunner = ScriptRunner()
scripts_current: ScriptRunner = None
"""Mirrors the module globals of ``modules/scripts.py`` (created by ``load_scripts`` upstream)."""
