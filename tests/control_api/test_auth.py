"""Sign-in, sessions, CSRF, tokens, the login rate limit and the audit of it all."""

from __future__ import annotations

import httpx

from control_api.auth import SESSION_COOKIE
from tests.control_api.conftest import PASSWORD, ApiClient, RunningApi, signed_in
from tests.polling import rows


async def test_login_sets_a_secure_httponly_strict_cookie(anonymous: ApiClient) -> None:
    response = await anonymous.login("operator")
    assert response.status_code == 200
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    lowered = cookie.lower()
    assert "httponly" in lowered
    assert "secure" in lowered
    assert "samesite=strict" in lowered
    body = response.json()
    assert body["name"] == "operator"
    assert body["role"] == "operator"
    assert body["csrf_token"]
    assert set(body["permissions"]) == {"view", "alerts"}
    me = await anonymous.get("/api/v1/auth/me")
    assert me.status_code == 200
    assert me.json()["name"] == "operator"


async def test_wrong_password_and_unknown_user_look_the_same_and_are_audited(
    anonymous: ApiClient, api: RunningApi
) -> None:
    wrong = await anonymous.login("operator", "not the password")
    unknown = await anonymous.login("nobody", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]
    failed = rows(
        api.database_url,
        "SELECT actor FROM audit_log WHERE action = 'login' AND outcome = 'failed' ORDER BY id",
    )
    assert [r[0] for r in failed] == ["operator", "nobody"]


async def test_login_is_rate_limited_per_user(anonymous: ApiClient, api: RunningApi) -> None:
    for _ in range(5):
        assert (await anonymous.login("responder", "wrong")).status_code == 401
    limited = await anonymous.login("responder", PASSWORD)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    assert limited.json()["error"]["code"] == "rate_limited"
    # another user from the same address is not locked out by this one
    assert (await anonymous.login("operator")).status_code == 200
    denied = rows(api.database_url, "SELECT count(*) FROM audit_log WHERE outcome = 'denied'")
    assert denied[0][0] == 1


async def test_state_changes_with_a_cookie_need_the_csrf_token(
    clients: dict[str, ApiClient],
) -> None:
    admin = clients["admin"]
    cookie_only = {"Cookie": admin.headers["Cookie"]}
    body = {"name": "csrf-victim", "role": "operator"}
    refused = await admin.http.post("/api/v1/users", json=body, headers=cookie_only)
    assert refused.status_code == 403
    assert "X-CSRF-Token" in refused.json()["error"]["message"]
    wrong = {**cookie_only, "X-CSRF-Token": "forged"}
    assert (await admin.http.post("/api/v1/users", json=body, headers=wrong)).status_code == 403
    ok = await admin.post("/api/v1/users", json=body)
    assert ok.status_code == 201
    assert ok.json()["password"]  # a generated one-time password, shown once


async def test_logout_ends_the_session(clients: dict[str, ApiClient]) -> None:
    engineer = clients["engineer"]
    assert (await engineer.post("/api/v1/auth/logout")).status_code == 204
    assert (await engineer.get("/api/v1/auth/me")).status_code == 401


async def test_bearer_tokens_are_issued_used_and_revoked(
    api: RunningApi, clients: dict[str, ApiClient]
) -> None:
    admin = clients["admin"]
    issued = await admin.post(
        "/api/v1/tokens", json={"user": "responder", "description": "disaster system"}
    )
    assert issued.status_code == 201
    token = issued.json()["token"]
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        machine = ApiClient(http)
        machine.use_token(token)
        me = await machine.get("/api/v1/auth/me")
        assert me.status_code == 200
        assert me.json() | {"permissions": None} == {
            "name": "responder", "role": "responder", "via": "token",
            "permissions": None, "csrf_token": None,
        }  # fmt: skip
        # a token needs no CSRF header: it is not sent by browsers on their own
        assert (
            await machine.post("/api/v1/alerts/none/acknowledge", json={"version": 1})
        ).status_code == 404
        listed = await admin.get("/api/v1/tokens")
        assert [t["description"] for t in listed.json()] == ["disaster system"]
        assert "token" not in listed.json()[0]
        assert (
            await admin.request("DELETE", f"/api/v1/tokens/{issued.json()['id']}")
        ).status_code == 204
        assert (await machine.get("/api/v1/auth/me")).status_code == 401
        machine.use_token(token[:-2] + "xx")
        assert (await machine.get("/api/v1/auth/me")).status_code == 401
    stored = rows(api.database_url, "SELECT secret_sha256 FROM api_tokens")
    assert token.encode() not in bytes(stored[0][0])


async def test_disabling_a_user_ends_their_sessions(
    api: RunningApi, clients: dict[str, ApiClient]
) -> None:
    patched = await clients["admin"].request(
        "PATCH", "/api/v1/users/operator", json={"disabled": True}
    )
    assert patched.status_code == 200
    assert (await clients["operator"].get("/api/v1/auth/me")).status_code == 401
    again = ApiClient(httpx.AsyncClient(base_url=api.base_url))
    assert (await again.login("operator")).status_code == 401
    await again.http.aclose()


async def test_changing_the_own_password(api: RunningApi) -> None:
    client = await signed_in(api, "engineer")
    wrong = await client.post(
        "/api/v1/auth/password", json={"current": "nope", "new": "a much longer secret"}
    )
    assert wrong.status_code == 422
    ok = await client.post(
        "/api/v1/auth/password", json={"current": PASSWORD, "new": "a much longer secret"}
    )
    assert ok.status_code == 204
    assert (await client.login("engineer", "a much longer secret")).status_code == 200
    await client.http.aclose()


async def test_state_changes_are_audited_with_actor_and_address(
    api: RunningApi, clients: dict[str, ApiClient]
) -> None:
    await clients["admin"].post("/api/v1/users", json={"name": "newbie", "role": "operator"})
    entries = await clients["admin"].get("/api/v1/audit", params={"action": "user.add"})
    assert entries.status_code == 200
    (entry,) = entries.json()
    assert entry["actor"] == "admin"
    assert entry["target"] == "newbie"
    assert entry["remote_addr"] == "127.0.0.1"


async def test_input_the_database_cannot_hold_is_a_clear_422(anonymous: ApiClient) -> None:
    response = await anonymous.login("nul\x00byte", "whatever")
    assert response.status_code == 422
    assert "invalid input" in response.json()["error"]["message"]
