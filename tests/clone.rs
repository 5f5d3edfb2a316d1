//! A checkout in a directory only its owner can enter (`mktemp -d`, root's home): the servers the
//! tests start for themselves must still run. As root they run as `postgres`, which cannot reach
//! such a checkout's target/ (issue "Step 12": three fault tests failed there with "could not
//! change directory ... Permission denied").

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

#[test]
fn a_clone_in_a_0700_directory_starts_a_private_postgres() {
    let home = std::env::temp_dir().join(common::unique("clone-0700"));
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let clone = home.join("lockstep");
    let out = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks", env!("CARGO_MANIFEST_DIR")])
        .arg(&clone)
        .output()
        .expect("git clone");
    assert!(out.status.success(), "git clone: {}", String::from_utf8_lossy(&out.stderr));
    let state = clone.join("target/testenv");
    std::fs::create_dir_all(&state).unwrap();

    // The clone's own scripts/testenv decides where the server lives, as the suite's tests do.
    let dir = common::private_pg::private_dir_in(&clone, &state, "clone");
    let pg = common::PrivatePostgres::start_in(dir.clone());
    let ready = common::pg_command("pg_isready")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .output()
        .unwrap();
    assert!(ready.status.success(), "{}", String::from_utf8_lossy(&ready.stdout));
    drop(pg);
    assert!(!dir.exists(), "the private server's folder outlived it");
    let out = Command::new(clone.join("scripts/testenv"))
        .arg("down")
        .env("LOCKSTEP_TESTENV_DIR", &state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(Path::new(&home)).unwrap();
}
