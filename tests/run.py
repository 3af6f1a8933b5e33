"""Runs every tests/test_*.py in its own pytest process; exits non-zero if any fails or none ran.

  python tests/run.py [pytest options, e.g. -x -k refiner]

One process per module: in one process for the whole suite, an XLA:CPU
compilation late in the run aborted the interpreter (SIGABRT) twice, though
every module passes on its own (BUILD_NOTES.md, "Tests").
"""

import pathlib
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
  here = pathlib.Path(__file__).resolve().parent
  files = sorted(here.glob('test_*.py'))
  if not files:
    print(f'no test files in {here}')
    return 1
  failed, passed, t0 = [], 0, time.time()
  for f in files:
    t = time.time()
    rc = subprocess.call([sys.executable, '-m', 'pytest', '-q', str(f), *argv], cwd=here.parent)
    print(f'{f.name}: exit {rc} in {time.time() - t:.0f} s', flush=True)
    if rc == 5:  # no tests collected (e.g. all deselected by -k): not a failure of the file
      continue
    if rc != 0:
      failed.append(f.name)
    else:
      passed += 1
  print(f'{len(files)} test files in {time.time() - t0:.0f} s; {passed} passed; failed: {failed or "none"}')
  return 1 if failed or not passed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
