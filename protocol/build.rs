use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent ttrpc code from proto/agent.proto failed");

    // The generated files open with inner attributes (`#![allow(..)]`), which `include!` cannot
    // take; lib.rs puts the equivalent allows on the wrapping modules instead.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out_dir.join(name);
        let text = fs::read_to_string(&path).expect("read generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !line.starts_with("#![") && !line.starts_with("//!")
            })
            .collect();
        fs::write(&path, kept.join("\n")).expect("write generated code");
    }
}
