//! Peers that lie, over real sockets: what they send is validated and bounded before it is used,
//! nothing they send panics a thread of the agent, and the agent keeps serving its honest peers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dmaplane::{Agent, Error, Testbed};
use dmaplane_rdma::oob::{Oob, OobListener};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// A `hello` as a peer would send it, from `agent`'s real metadata with its name replaced.
fn hello(agent: &Agent, name: &str) -> Value {
    let mut metadata = serde_json::to_value(agent.metadata()).unwrap();
    metadata["agent"] = json!(name);
    json!({"msg": "hello", "version": dmaplane::metadata::VERSION, "metadata": metadata, "qps": 1, "nonce": 7})
}

/// Send one `hello` over a fresh connection and return the answer (`None` when the
/// connection closed without one).
fn say_hello(to: &Agent, hello: &Value) -> Option<Value> {
    let oob = Oob::connect(to.listen_addr(), T).unwrap();
    oob.send(hello).unwrap();
    oob.recv::<Value>(T).ok()
}

#[test]
fn names_with_control_characters_are_refused_by_field_and_the_listener_keeps_serving() {
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()
        .unwrap();
    let liar = Agent::builder("liar")
        .testbed(tb.clone())
        .nics(["nic2"])
        .build()
        .unwrap();
    // More hellos than the listener serves at once: each must be answered and released (a
    // thread that panicked on the name used to keep its slot, and 64 of them shut the listener).
    for (i, bad) in ["evil\0peer", "tab\tname", "", &"x".repeat(256)]
        .iter()
        .cycle()
        .take(70)
        .enumerate()
    {
        let answer = say_hello(&a, &hello(&liar, bad));
        let answer = answer.unwrap_or_else(|| panic!("hello {i} ({bad:?}) got no answer"));
        assert_eq!(answer["msg"], "refuse", "hello {i} ({bad:?}): {answer}");
        let why = answer["why"].as_str().unwrap();
        assert!(why.contains("agent"), "hello {i}: {why}");
    }
    // Nobody was listed, and an honest peer still gets in.
    assert!(a.peers().is_empty(), "{:?}", a.peers());
    let b = Agent::builder("b")
        .testbed(tb)
        .nics(["nic1"])
        .build()
        .unwrap();
    let peer = b.connect_to(&a.listen_addr().to_string()).unwrap();
    assert_eq!(peer.name(), "a");
    assert!(a.stats().peers_refused >= 70, "{:?}", a.stats());
    // Every handshake's slot is given back (the honest one's as its thread ends).
    let due = std::time::Instant::now() + T;
    while a.stats().handshakes_under_way > 0 && std::time::Instant::now() < due {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.stats().handshakes_under_way, 0, "{:?}", a.stats());
}

#[test]
fn a_listener_that_names_itself_with_a_nul_gets_an_error_not_a_panic() {
    let tb = Testbed::builtin().unwrap();
    let b = Agent::builder("b")
        .testbed(tb.clone())
        .nics(["nic1"])
        .build()
        .unwrap();
    let other = Agent::builder("other")
        .testbed(tb)
        .nics(["nic0"])
        .build()
        .unwrap();
    let listener = OobListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let mut metadata = serde_json::to_value(other.metadata()).unwrap();
    metadata["agent"] = json!("lis\0tener");
    // No NICs: no paths to build, so the caller goes straight on to list the peer.
    metadata["nics"] = json!([]);
    let fake = std::thread::spawn(move || {
        let oob = listener.accept(T).unwrap();
        let _hello: Value = oob.recv(T).unwrap();
        oob.send(&json!({"msg": "welcome", "metadata": metadata}))
            .unwrap();
        // Hold the connection until the caller gave up.
        let _ = oob.recv::<Value>(Duration::from_secs(2));
    });
    let e = b.connect_to(&addr.to_string()).unwrap_err();
    assert!(matches!(&e, Error::Invalid(i) if i.field == "agent"), "{e}");
    fake.join().unwrap();
    assert!(b.peers().is_empty());
}
