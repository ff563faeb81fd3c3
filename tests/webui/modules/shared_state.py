"""Double of ``modules/shared_state.py`` (A1111 1.10): the ``State`` object behind ``shared.state``.

Only the bookkeeping is kept (flags, job counters, sampling step counters, current latent). Live
preview decoding, the server-restart signal and logging of job timing are reduced to plain fields.
"""
from __future__ import annotations

import datetime
import threading
import time


class State:
    """Mirrors ``modules.shared_state.State``: global progress and interrupt flags of the running job."""

    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None

    def __init__(self):
        """Mirrors ``State.__init__``: per-instance server-command signal."""
        self._server_command_signal = threading.Event()
        self._server_command = None
        self.server_start = time.time()

    @property
    def need_restart(self) -> bool:
        """Mirrors ``State.need_restart``."""
        return self.server_command == "restart"

    @need_restart.setter
    def need_restart(self, value: bool) -> None:
        """Mirrors ``State.need_restart`` (modules/shared_state.py)."""
        if value:
            self.server_command = "restart"

    @property
    def server_command(self):
        """Mirrors ``State.server_command``."""
        return self._server_command

    @server_command.setter
    def server_command(self, value) -> None:
        """Mirrors ``State.server_command`` (modules/shared_state.py)."""
        self._server_command = value
        self._server_command_signal.set()

    def skip(self):
        """Mirrors ``State.skip``: the current image is abandoned (CFGDenoiser raises InterruptedException)."""
        self.skipped = True

    def interrupt(self):
        """Mirrors ``State.interrupt``: the whole job is abandoned."""
        self.interrupted = True

    def stop_generating(self):
        """Mirrors ``State.stop_generating`` (1.9+): finish the current image, then stop."""
        self.stopping_generation = True

    def nextjob(self):
        """Mirrors ``State.nextjob``: advance the job counter and reset the sampling step."""
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self):
        """Mirrors ``State.dict``: a JSON-able snapshot used by the progress API."""
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def begin(self, job: str = "(unknown)"):
        """Mirrors ``State.begin``: reset every per-job field."""
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job

    def end(self):
        """Mirrors ``State.end``."""
        self.job = ""
        self.job_count = 0

    def set_current_image(self):
        """Mirrors ``State.set_current_image`` (live preview); a no-op in the double."""

    def do_set_current_image(self):
        """Mirrors ``State.do_set_current_image``; a no-op in the double."""

    def assign_current_image(self, image):
        """Mirrors ``State.assign_current_image``."""
        self.current_image = image
        self.id_live_preview += 1
