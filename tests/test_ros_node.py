"""The ROS 2 node: its ROS-free core (edgevlm.ros.NodeConfig, NodeCore, record, diagnostics) answers about the
latest frame of rosbags-typed messages as a direct call does, asks in topic mode only about new frames, refuses
stale frames and bad parameters in one line; the package files (service, parameters, launch, entry point) agree
with the code; the rclpy shell itself runs where rclpy imports (not on these machines)."""

import ast
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevlm.errors import UsageError
from edgevlm.ros import PARAMETERS, NodeConfig, NodeCore, diagnostics, record
from edgevlm.runner import Runner

rosbags = pytest.importorskip("rosbags")
from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # noqa: E402

TYPES = get_typestore(Stores.ROS2_HUMBLE)
ImageMsg = TYPES.types["sensor_msgs/msg/Image"]
Header = TYPES.types["std_msgs/msg/Header"]
Time = TYPES.types["builtin_interfaces/msg/Time"]
ROS2 = Path(__file__).resolve().parents[1] / "ros2"
SHORT = {"max_new_tokens": 4, "think_budget": 4}


def image_message(seed: int = 0):
    bgr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return ImageMsg(header=Header(stamp=Time(sec=0, nanosec=0), frame_id="camera"), height=48, width=64,
                    encoding="bgr8", is_bigendian=0, step=64 * 3, data=bgr.reshape(-1)), bgr[..., ::-1]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def node(tiny_bundle):
    """(core, pipeline) over the tiny bundle, with a clock the test moves."""
    config = NodeConfig.of({"bundle": str(tiny_bundle), **SHORT, "max_frame_age_s": 5.0})
    pipe = config.source().load()
    with Runner(pipe) as runner:
        yield NodeCore(runner, config, clock=Clock()), pipe


def test_the_core_answers_about_the_latest_frame_as_a_direct_call_does(node):
    core, pipe = node
    answer, result = core.answer("What is shown?")
    assert not answer["ok"] and result is None
    assert answer["error"] == "no image has come on /camera/image_raw yet"
    core.on_image(image_message(1)[0])
    msg, rgb = image_message(2)
    core.on_image(msg)  # the newest frame is the one asked about
    answer, result = core.answer("What is shown?")
    direct = pipe(rgb, "What is shown?", **core.config.options())
    assert answer["ok"] and answer["answer"] == result.answer == direct.answer
    assert {k: s.token_ids for k, s in result.stages.items()} == {k: s.token_ids for k, s in direct.stages.items()}
    assert json.loads(json.dumps(answer))["result"]["extraction"] == direct.extraction  # what ~/answer carries
    # multiple choice through the service's choices: the answer is one of the letters or none, with a note
    answer, result = core.answer("Which color?", ["red", "green"])
    assert answer["answer"] in ("", "A", "B") and result.multiple_choice


def test_a_frame_older_than_the_limit_is_refused_in_one_line(node):
    core, _ = node
    core.on_image(image_message()[0])
    core.clock.now += 6.0
    answer, _ = core.answer("What is shown?")
    assert not answer["ok"] and "is 6.0 s old (max_frame_age_s 5)" in answer["error"]
    assert "\n" not in answer["error"]


def test_topic_mode_asks_once_per_new_frame(tiny_bundle):
    config = NodeConfig.of({"bundle": str(tiny_bundle), **SHORT, "question": "Is the path clear?"})
    with Runner(config.source().load()) as runner:
        core = NodeCore(runner, config)
        assert core.tick() is None  # no frame yet: nothing to ask
        core.on_image(image_message(1)[0])
        first = core.tick()
        assert first is not None and core.tick() is None  # the same frame is not asked about twice
        end = time.monotonic() + 60
        while runner.waiting:  # the first is on the models (a waiting one would be replaced: latest="periodic")
            assert time.monotonic() < end
            time.sleep(0.01)
        core.on_image(image_message(2)[0])
        second = core.tick()
        for request in (first, second):
            result = request.result(timeout=120)
            assert result.question == "Is the path clear?" and result.stages["think"]


def test_diagnostics_carry_every_stage_and_warn_on_a_cut(node):
    core, _ = node
    core.on_image(image_message()[0])
    _, result = core.answer("What is shown?")
    statuses = diagnostics(result)
    assert [s["name"] for s in statuses] == ["edgevlm: answer", "edgevlm: plan", "edgevlm: extract", "edgevlm: think"]
    assert all(s["level"] == "OK" for s in statuses)
    for status in statuses:
        assert all(isinstance(v, str) and np.isfinite(float(v)) for v in status["values"].values())
    assert float(statuses[1]["values"]["total_ms"]) == pytest.approx(result.stages["plan"].timings.total_ms, abs=0.1)
    cut = core.runner.submit(core.frame(), "What is shown?", deadline_s=0, **SHORT).result(timeout=60)
    statuses = diagnostics(cut)
    assert statuses[0]["level"] == "WARN" and statuses[0]["message"] == f"cut in {cut.cut}"


def test_a_failed_request_is_a_record_with_one_line(node):
    core, _ = node
    answer = record("q", error=UsageError("the question is empty"))
    assert answer == {"ok": False, "question": "q", "answer": "", "answer_json": None,
                      "error": "the question is empty", "result": None}
    core.on_image(image_message()[0])
    answer, _ = core.answer("   ")
    assert not answer["ok"] and "question" in answer["error"]


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=8),
                   st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*PARAMETERS, "bogus"]), VALUES, max_size=5))
def test_every_parameter_set_is_accepted_or_refused_in_one_line(values):
    values.setdefault("bundle", "some/bundle")
    try:
        config = NodeConfig.of(values)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    for name, (default, _) in PARAMETERS.items():
        assert isinstance(config[name], type(default))
    assert config.options()["mode"] == config["mode"]


# ------------------------------------------------------------------------------------------ the package files
def test_the_service_definition_parses_and_has_the_fields_the_node_fills():
    request, response = (ROS2 / "edgevlm_interfaces" / "srv" / "Ask.srv").read_text().split("\n---\n")
    fields = {}
    for half, text in (("Request", request), ("Response", response)):
        (name, (_, parsed)), = get_types_from_msg(text, f"edgevlm_interfaces/srv/Ask_{half}").items()
        fields[half] = [f for f, _ in parsed]
    assert fields == {"Request": ["question", "choices"], "Response": ["ok", "answer", "error", "record_json"]}
    shell = (Path(__file__).resolve().parents[1] / "edgevlm" / "ros_node.py").read_text()
    for name in ("request.question", "request.choices", "response.ok", "response.answer", "response.error",
                 "response.record_json"):
        assert name in shell


def test_the_shipped_parameters_are_the_nodes_and_pass_its_checks():
    yaml = pytest.importorskip("yaml")
    shipped = yaml.safe_load((ROS2 / "edgevlm_ros" / "config" / "edgevlm.yaml").read_text())
    params = shipped["edgevlm"]["ros__parameters"]
    assert set(params) <= set(PARAMETERS)
    NodeConfig.of(params)


def test_the_launch_file_starts_the_packages_entry_point():
    launch = ast.parse((ROS2 / "edgevlm_ros" / "launch" / "edgevlm.launch.py").read_text())
    (node,) = [n for n in ast.walk(launch) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Node"]
    kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
    assert kw["package"] == "edgevlm_ros" and kw["executable"] == "node" and kw["name"] == "edgevlm"
    setup = (ROS2 / "edgevlm_ros" / "setup.py").read_text()
    assert '"console_scripts": [f"node = {package}.node:main"]' in setup and 'package = "edgevlm_ros"' in setup
    entry = (ROS2 / "edgevlm_ros" / "edgevlm_ros" / "node.py").read_text()
    assert "from edgevlm.ros_node import main" in entry


def test_the_node_module_imports_without_ros_and_says_what_is_missing():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['rclpy'] = None\n"
                           "from edgevlm.ros_node import main; main([])"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("edgevlm: the ROS 2 node needs rclpy")
    assert proc.stderr.strip().count("\n") == 0


# ------------------------------------------------------------------------------------------ the rclpy shell
def test_the_rclpy_node_answers_a_question_topic_and_publishes_diagnostics(tiny_bundle):
    rclpy = pytest.importorskip("rclpy")  # not installable on these machines: runs where ROS 2 is sourced
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from edgevlm.ros_node import EdgeVLMNode

    rclpy.init(args=["--ros-args", "-p", f"bundle:={tiny_bundle}", "-p", "max_new_tokens:=4",
                     "-p", "think_budget:=4"])
    try:
        node = EdgeVLMNode()
        assert node.node.get_parameter("bundle").value == str(tiny_bundle)
        assert node.node.get_parameter("image_topic").type_ == Parameter.Type.STRING
        peer = rclpy.create_node("edgevlm_test_peer")
        answers, diags = [], []
        peer.create_subscription(String, "/edgevlm/answer", lambda m: answers.append(json.loads(m.data)), 10)
        peer.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 10)
        camera = peer.create_publisher(Image, "/camera/image_raw", 10)
        questions = peer.create_publisher(String, "/edgevlm/question", 10)
        executor = MultiThreadedExecutor()
        executor.add_node(node.node)
        executor.add_node(peer)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        msg, _ = image_message()
        image = Image(height=msg.height, width=msg.width, encoding=msg.encoding, is_bigendian=0, step=msg.step,
                      data=bytes(msg.data))
        end = time.monotonic() + 60
        while not answers and time.monotonic() < end:
            camera.publish(image)
            time.sleep(0.2)
            questions.publish(String(data="What is shown?"))
            time.sleep(0.5)
        assert answers and answers[-1]["question"] == "What is shown?"
        assert any(a["ok"] for a in answers) and diags
        executor.shutdown()
        node.close()
        peer.destroy_node()
    finally:
        rclpy.try_shutdown()
