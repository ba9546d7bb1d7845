# The router-svc binary's command line: --help, --version, and refusing a
# bad config file at start-up with the file and line in the message.
# Run with: cmake -DBIN=path/to/router-svc -DWORK=scratch/dir -P cli_test.cmake
cmake_minimum_required(VERSION 3.18)

# Runs router-svc; sets rc, out, err, and found (whether `want` is in stdout
# or stderr, or 1 when `want` is empty).
function(run_svc want)
  execute_process(COMMAND ${BIN} ${ARGN}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 20)
  set(found 1)
  if(NOT want STREQUAL "")
    string(FIND "${out}${err}" "${want}" at)
    if(at EQUAL -1)
      set(found 0)
    endif()
  endif()
  set(rc "${rc}" PARENT_SCOPE)
  set(out "${out}" PARENT_SCOPE)
  set(err "${err}" PARENT_SCOPE)
  set(found "${found}" PARENT_SCOPE)
endfunction()

macro(fail what)
  message(FATAL_ERROR "router-svc ${what}\nexit: ${rc}\nstdout:\n${out}\nstderr:\n${err}")
endmacro()

file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})

run_svc("--config TEXT  (env ROUTER_CONFIG)" --help)
if(NOT rc EQUAL 0 OR NOT found)
  fail("--help: expected exit 0 and --config (env ROUTER_CONFIG) in the text")
endif()

run_svc("router-svc " --version)
if(NOT rc EQUAL 0 OR NOT found)
  fail("--version: expected exit 0 and the version")
endif()

# A bad number on line 3: refused before anything is bound.
file(WRITE ${WORK}/bad.conf "[rules]\n\nsummarization_min_user_messages = ten\n")
run_svc("bad.conf:3: bad number 'ten'" --config ${WORK}/bad.conf --listen 127.0.0.1:0)
if(NOT rc EQUAL 2 OR NOT found)
  fail("--config bad.conf: expected exit 2 and \"bad.conf:3: bad number 'ten'\"")
endif()

# A misspelt key, through the environment variable this time.
file(WRITE ${WORK}/typo.conf "[strategy.analytical]\ntemprature = 0.3\n")
set(ENV{ROUTER_CONFIG} ${WORK}/typo.conf)
run_svc("typo.conf:2: unknown key 'temprature' in [strategy.analytical]" --listen 127.0.0.1:0)
unset(ENV{ROUTER_CONFIG})
if(NOT rc EQUAL 2 OR NOT found)
  fail("with ROUTER_CONFIG=typo.conf: expected exit 2 and typo.conf:2: unknown key")
endif()

run_svc("missing.conf: cannot read" --config ${WORK}/missing.conf --listen 127.0.0.1:0)
if(NOT rc EQUAL 2 OR NOT found)
  fail("--config missing.conf: expected exit 2 and \"cannot read\"")
endif()

run_svc("--log-level" --log-level loud)
if(NOT rc EQUAL 2 OR NOT found)
  fail("--log-level loud: expected exit 2")
endif()

run_svc("unknown option" --bogus)
if(NOT rc EQUAL 2 OR NOT found)
  fail("--bogus: expected exit 2")
endif()
