"""`seqlab` whose input pauses at one batch until a signal arrives: _paused_train.py AT MARKER ARGS...

Gives a test an exact moment to SIGKILL / SIGTERM a run, without timing: when the run draws
its AT-th batch (counted in this process, from 1) it creates the file MARKER and waits. A
SIGTERM is passed on to the handler the training engine installed (which asks the run to save
and stop) and lets the input continue; a SIGKILL needs no help. Only the data iterator is
wrapped (its state and batches pass through unchanged), so the numbers are those of the plain
command. tests/_multihost_worker.py uses `pause_input` too.
"""

import signal
import sys
import threading

from seqlab import cli, loop


class _Paused:

  def __init__(self, iterator, at: int, marker: str):
    self._iterator, self._at, self._marker, self._drawn = iterator, at, marker, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._drawn += 1
    if self._drawn == self._at:
      received = threading.Event()
      engine_handler = signal.getsignal(signal.SIGTERM)

      def handler(signum, frame):
        if callable(engine_handler):
          engine_handler(signum, frame)
        received.set()

      signal.signal(signal.SIGTERM, handler)
      open(self._marker, "w").close()
      while not received.wait(0.05):
        pass
    return next(self._iterator)

  def __getattr__(self, name):  # get_state, set_state, stats
    return getattr(self._iterator, name)


def pause_input(at: int, marker: str) -> None:
  """Makes `seqlab.loop.make_input`'s training iterators pause at batch `at` (see above)."""
  make_input = loop.make_input

  def paused(config, architecture, split, **kwargs):
    it = make_input(config, architecture, split, **kwargs)
    return _Paused(it, at, marker) if split == "train" else it

  loop.make_input = paused


def main():
  pause_input(int(sys.argv[1]), sys.argv[2])
  return cli.main(sys.argv[3:])


if __name__ == "__main__":
  sys.exit(main())
