"""Measuring on a real device: ``bench``/``validate --remote ssh://user@host[:port]`` (or a target
profile's ``remote = ...``) run onnxruntime on the device and bring the numbers back.

- :mod:`~edgecomp.remote.transport`: the link (system ssh/scp; a work folder that always goes);
- :mod:`~edgecomp.remote.runner`: the small, versioned script run on the device (python3, numpy,
  onnxruntime only);
- :mod:`~edgecomp.remote.device`: probe versions, stage files, run the runner, fetch results;
- :mod:`~edgecomp.remote.measure`: bench and validate on a device, scored by the host's own code.

``adb://SERIAL`` (Android) is not built. The transport interface fits it (``adb push`` for put,
``adb pull`` for get, ``adb shell`` for run, ``mktemp -d`` under ``/data/local/tmp`` with the same
trap-on-EOF anchor), but the runner does not: onnxruntime publishes for Android only the AAR
(``com.microsoft.onnxruntime:onnxruntime-android`` on Maven: ``libonnxruntime.so`` per ABI plus
the Java/JNI layer) and no Python wheel for Android, and no prebuilt ``onnxruntime_perf_test``
(maintainers: "build onnxruntime_perf_test from source ... I don't believe we release it",
microsoft/onnxruntime#18664).
An adb target therefore needs a native runner: a small C program against the C API in the AAR's
``libonnxruntime.so`` (headers from the same release), cross-compiled with the NDK per ABI and
pushed with the models; or Termux's python with an onnxruntime built in Termux, reached over ssh
(which this package already handles: run sshd in Termux and use ``ssh://``).
"""

__all__ = ["connect", "profile_device"]


def connect(address: str, python: str = "python3", **options):
    """The :class:`~edgecomp.remote.device.Device` at ``address`` (``ssh://user@host[:port]``), its
    runner run by ``python``; ``options`` go to the transport (timeouts, ssh config, tmp folder)."""
    from edgecomp.remote.device import Device
    from edgecomp.remote.transport import parse_address

    return Device(parse_address(address, **options), python)


def profile_device(profile):
    """The device of a target profile with ``remote = ...`` (its python and ssh config), else None."""
    if profile is None or not profile.remote:
        return None
    return connect(profile.remote, python=profile.python or "python3", config_file=profile.ssh_config)
