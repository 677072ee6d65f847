//! `mesh-agent`: parses the command line and hands over to the library; see
//! `mesh_agent::command` and `mesh_agent::app`.

fn main() -> std::process::ExitCode {
    mesh_agent::command::main()
}
