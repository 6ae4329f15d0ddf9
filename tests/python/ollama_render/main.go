// Renders Ollama Modelfile templates the way Ollama's server does, with Go's own
// text/template: the reference our Go templates are checked against (templates must
// give the prompt the model was trained on, which transformers renders from the Jinja).
//
// stdin: a JSON list of {"template", "system", "messages": [{"role", "content"}]};
// stdout: a JSON list of rendered prompts (or {"error": ...} per case).
//
// What it reproduces from Ollama's source (server/routes.go ChatHandler and
// template/template.go Execute): the Modelfile's SYSTEM is prepended as a system
// message when the conversation does not start with one; consecutive messages of one
// role are collated with "\n\n"; the template gets .System (every system message,
// joined), .Messages, .Tools, .Response "", .Think; templates that do not use
// .Messages get the legacy .System/.Prompt/.Response values.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type Message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Thinking  string `json:"thinking"`
	ToolCalls []any  `json:"tool_calls"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
	Think    bool      `json:"think"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
}

// Whether the template reads .Messages anywhere (Ollama's Vars check).
func usesMessages(t *template.Template) bool {
	found := false
	var walk func(n parse.Node)
	walk = func(n parse.Node) {
		if n == nil || found {
			return
		}
		switch n := n.(type) {
		case *parse.ListNode:
			if n != nil {
				for _, c := range n.Nodes {
					walk(c)
				}
			}
		case *parse.ActionNode:
			walk(n.Pipe)
		case *parse.PipeNode:
			if n != nil {
				for _, c := range n.Cmds {
					walk(c)
				}
			}
		case *parse.CommandNode:
			for _, a := range n.Args {
				walk(a)
			}
		case *parse.FieldNode:
			for _, id := range n.Ident {
				if strings.EqualFold(id, "Messages") {
					found = true
				}
			}
		case *parse.VariableNode:
			for _, id := range n.Ident {
				if strings.EqualFold(id, "Messages") {
					found = true
				}
			}
		case *parse.IfNode:
			walk(n.Pipe)
			walk(n.List)
			walk(n.ElseList)
		case *parse.RangeNode:
			walk(n.Pipe)
			walk(n.List)
			walk(n.ElseList)
		case *parse.WithNode:
			walk(n.Pipe)
			walk(n.List)
			walk(n.ElseList)
		case *parse.TemplateNode:
			walk(n.Pipe)
		}
	}
	walk(t.Tree.Root)
	return found
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func render(c Case) (string, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
	}
	system, collated := collate(msgs)
	var buf bytes.Buffer
	if usesMessages(t) {
		err = t.Execute(&buf, map[string]any{
			"System": system, "Messages": collated, "Tools": nil,
			"Response": "", "Think": c.Think, "ThinkLevel": "", "IsThinkSet": false,
		})
	} else {
		prompt := ""
		if n := len(collated); n > 0 && collated[n-1].Role == "user" {
			prompt = collated[n-1].Content
		}
		err = t.Execute(&buf, map[string]any{"System": system, "Prompt": prompt, "Response": ""})
	}
	return buf.String(), err
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	out := make([]any, len(cases))
	for i, c := range cases {
		s, err := render(c)
		if err != nil {
			out[i] = map[string]string{"error": err.Error()}
		} else {
			out[i] = s
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
