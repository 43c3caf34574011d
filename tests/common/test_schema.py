import pyarrow as pa
import pytest

from common import schema as S


def _row(turn: int, last: bool) -> dict:
    return {
        S.RUN_ID: "r", S.GROUP_ID: 3, S.EPISODE_ID: 7, S.PROMPT_ID: 11, S.TURN_INDEX: turn,
        S.POLICY_VERSION: 2, S.CONTEXT_TOKEN_IDS: [1, 2, 3] if turn == 0 else [],
        S.ACTION_TOKEN_IDS: [4, 5], S.ACTION_LOGPROBS: [-0.5, -1.25], S.OBSERVATION_TOKEN_IDS: [] if last else [6],
        S.STATE_HASH: -42, S.TURN_REWARD: 0.7, S.TURN_REWARD_COMPONENTS: {"tool_execution": 0.2, "result_contains_answer": 0.5},
        S.IS_LAST_TURN: last, S.OUTCOME_REWARD: 1.4 if last else 0.0,
        S.OUTCOME_REWARD_COMPONENTS: {"exact_match": 1.0, "format": 0.2, "xml": 0.2} if last else {},
        S.TRUNCATED: False, S.TOOL_CALLED: not last, S.TOOL_SUCCESS: not last, S.RESULT_CONTAINS_ANSWER: not last,
        S.GROUP_SIZE: 8, S.T_START: 1.5, S.T_END: 2.5,
    }


def test_arrow_round_trip_through_ipc():
    rows = [_row(0, False), _row(1, True)]
    batch = S.transitions_to_batch(rows)
    assert batch.schema.equals(S.TRANSITION_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    back = pa.ipc.open_stream(sink.getvalue()).read_all().to_pylist()
    assert back[0][S.CONTEXT_TOKEN_IDS] == [1, 2, 3]
    assert back[1][S.OBSERVATION_TOKEN_IDS] == []
    comps = S.components_to_dict(back[0][S.TURN_REWARD_COMPONENTS])
    assert comps == pytest.approx({"tool_execution": 0.2, "result_contains_answer": 0.5})
    assert back[1][S.ACTION_LOGPROBS] == [-0.5, -1.25]
    assert back[1][S.IS_LAST_TURN] is True


def test_missing_column_is_named():
    row = _row(0, True)
    del row[S.STATE_HASH]
    try:
        S.transitions_to_batch([row])
    except KeyError as e:
        assert S.STATE_HASH in str(e)
    else:
        raise AssertionError("missing column accepted")
