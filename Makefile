# The two README commands. Both create .venv/ on first use and reuse it afterwards.
#   make demo   - the live demo (node + camera + recorder over DDS on loopback)
#   make test   - the test suite
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FRAMES ?= 40
OUT ?= demo_out
# The ros2 CLI and launch as wheels, for the tests that run `ros2 launch/run/param/topic`
# (beside the checkout in the dev tree; a clone without it skips them).
ROS2CLI_WHEELS ?= ../shared/ros2cli
# DDS discovery stays on this machine; tests pick their own free ROS_DOMAIN_ID.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
# The ros2 tools find the PyPI ROS 2 wheels' packages through the ament index in the venv
# (a sourced ROS 2 sets its own).
export AMENT_PREFIX_PATH ?= $(CURDIR)/$(VENV)

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-ros.txt requirements-dev.txt setup.py \
		$(wildcard $(ROS2CLI_WHEELS)/*.whl)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	# CPU build on this machine; GPU users: see README "GPU".
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@if [ -n "$$ROS_DISTRO" ] && $(VPY) -c 'import rclpy' 2>/dev/null; then \
		echo "Using the sourced ROS 2 $$ROS_DISTRO"; \
	else \
		echo "No ROS 2 sourced: installing the ROS 2 Python wheels from PyPI"; \
		$(VPY) -m pip install --quiet -r requirements-ros.txt; \
		if ls $(ROS2CLI_WHEELS)/*.whl >/dev/null 2>&1; then \
			echo "Installing the ros2 CLI and launch wheels from $(ROS2CLI_WHEELS) (tests)"; \
			$(VPY) -m pip install --quiet osrf-pycommon catkin-pkg; \
			$(VPY) -m pip install --quiet --no-deps $(ROS2CLI_WHEELS)/*.whl; \
		fi; \
	fi
	$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m metricgold_ros.synthetic.demo --frames $(FRAMES) --out $(OUT)

# pytest.ini blocks the launch_testing/launch_ros/launch_pytest pytest plugins (they break
# pytest >= 9); the launch tests run `ros2 launch` in a subprocess instead.
test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider test

clean:
	rm -rf $(VENV) build install log demo_out
