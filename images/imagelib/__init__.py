"""The library the image scripts share (images/build.py, images/lab.py, images/arm64.py, images/arm64_lab.py).

- :mod:`.cache`: targets, their cache entries under ``${XDG_CACHE_HOME:-~/.cache}/pyvmm/<target>-<hash>/``,
  and the cache key: a hash of the target's real inputs.
- :mod:`.repro`: the fixed time and environment that make every output byte-reproducible.
- :mod:`.kernel`: a Linux build from Debian's linux-source package and a config fragment.
- :mod:`.tree`: a busybox guest tree, and it as a newc cpio archive or a reproducible ext4 image.
- :mod:`.debian`: a private apt state for another architecture's Debian packages (arm64).
- :mod:`.elf`: the few ELF facts the scripts check (notes, machine, sections, needed libraries).
- :mod:`.modules`: the load order of kernel modules, from their ``.modinfo``.

A target's cache key is made of what decides its outputs: its config fragment or init script, the Debian
versions of the sources and tools, and the source text of the code that builds it (the library modules it
uses, :mod:`.repro`, and the script's own build function; :func:`.cache.code_inputs`).  Editing a script's
command-line handling, its logging or another target's recipe rebuilds nothing.

Standard library only (Python 3.11).
"""
