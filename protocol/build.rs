//! Generates the protobuf messages (`agent.rs`) and the async ttrpc client and
//! server (`agent_ttrpc.rs`) from `protos/agent.proto` into `OUT_DIR`, with
//! pure-Rust code generation (no `protoc` needed).

use std::path::PathBuf;
use std::{env, fs};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["protos/agent.proto"];

fn main() {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));

    Codegen::new()
        .out_dir(&out_dir)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        // Our own module file below; the generated one leaves out `_ttrpc`.
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc/protobuf code generation failed");

    // Module declarations for lib.rs to `include!`. The generated files carry
    // inner attributes, so they must be real modules (`mod x;`), not
    // `include!`d into an inline module. Generated code is exempt from lints.
    let allow = "#[allow(clippy::all, clippy::pedantic, clippy::nursery, clippy::restriction, \
                 missing_docs, unused_imports, unused_qualifications, unreachable_pub, \
                 non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]";
    let modules = format!(
        "/// Protobuf messages of the agent API (generated from `agent.proto`).\n\
         {allow}\npub mod agent;\n\
         /// Async ttrpc client (`AgentServiceClient`) and server trait \
         (`AgentService`, `create_agent_service`) (generated from `agent.proto`).\n\
         {allow}\npub mod agent_ttrpc;\n"
    );
    fs::write(out_dir.join("generated_mods.rs"), modules).expect("write generated_mods.rs");
}
